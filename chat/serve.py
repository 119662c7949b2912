"""`mlx_linear serve`: mlx-lm's OpenAI-compatible server (mlx_lm.server, its own code) on a
linearized model loaded the chat's way: by default the bundled SmolLM2 with its adapter merged
into the weights, OpenBLAS loaded before MLX, the chat's prefill step and reply length.

Concurrent requests decode together (batch.py). Between turns mlx-lm's prompt cache keeps each
conversation's cache, which here is its constant-size state: a turn that extends the last one
prefills only its new tokens. A state cannot be rewound, so a conversation whose history changed
(an edited message) is prefilled again from the longest prefix still kept (its system prompt).
"""

import sys

import click

from mlx_linear.cli import log

from .cli import model_options


@click.command(context_settings={"ignore_unknown_options": True})
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1), help="Per reply, unless a request says.")
@click.argument("server_options", nargs=-1, type=click.UNPROCESSED)
def serve(model, adapter, keep_quantized, host, port, max_tokens, server_options):
    """Serve the model over HTTP with OpenAI's API (mlx_lm.server): /v1/chat/completions,
    /v1/completions. Requests sample greedily unless they say otherwise. Any other mlx_lm.server
    option goes after the others, e.g. `--decode-concurrency 8`."""
    import mlx_lm.server as server

    from .model import load_chat_model
    from .session import PREFILL_STEP

    loaded, tokenizer, name = load_chat_model(model, adapter, log=log, dequantize=False if keep_quantized else "auto")
    argv = ["--model", name, "--host", host, "--port", str(port), "--max-tokens", str(max_tokens),
            "--prefill-step-size", str(PREFILL_STEP), *server_options]
    provider_class = server.ModelProvider

    class OneModel(provider_class):
        """The model loaded above, whatever model name a request gives (OpenAI clients send one)."""

        def load(self, model_path, adapter_path=None, draft_model_path=None):
            if self.model is None:
                self.model, self.tokenizer, self.model_key, self.is_batchable = loaded, tokenizer, (name, None, None), True
            return self.model, self.tokenizer

    # mlx_lm.server's main() parses its options and builds its provider: this one, for its run.
    server.ModelProvider, sys.argv = OneModel, ["mlx_linear serve", *argv]
    log(f"serving {name} at http://{host}:{port}/v1 (OpenAI's API); Ctrl-C stops")
    try:
        server.main()
    finally:
        server.ModelProvider = provider_class

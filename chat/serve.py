"""`mlx_linear serve`: mlx-lm's OpenAI-compatible server (mlx_lm.server, its own code) on a
linearized model loaded the chat's way: by default the bundled SmolLM2 with its adapter merged
into the weights, OpenBLAS loaded before MLX, the chat's prefill step and reply length.

Concurrent requests decode together (batch.py). Between turns mlx-lm's prompt cache keeps each
conversation's cache, which here is its constant-size state: a turn that extends the last one
prefills only its new tokens. A state cannot be rewound, so a conversation whose history changed
(an edited message) is prefilled again from the longest prefix still kept (its system prompt).
"""

import socket
import sys

import click

from mlx_linear.cli import log
from mlx_linear.errors import UserError

from .cli import model_options


@click.command(context_settings={"ignore_unknown_options": True})
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1), help="Per reply, unless a request says.")
@click.argument("server_options", nargs=-1, type=click.UNPROCESSED)
def serve(model, adapter, keep_quantized, host, port, max_tokens, server_options):
    """Serve the chat's model over HTTP with OpenAI's API (mlx_lm.server), requests batched.

    /v1/chat/completions and /v1/completions; requests sample greedily unless they say otherwise.
    Any other mlx_lm.server option goes after the others, e.g. `--decode-concurrency 8`."""
    import mlx_lm.server as server

    serve_http = server.run

    def run(host, port, provider):  # main() parsed the server's options: bad ones exit before any loading
        check_port(host, port)
        from .model import load_chat_model

        loaded, tokenizer, name = load_chat_model(model, adapter, log=log, dequantize=False if keep_quantized else "auto")
        provider.model, provider.tokenizer, provider.model_key, provider.is_batchable = loaded, tokenizer, (name, None, None), True
        provider.load = lambda *names: (loaded, tokenizer)  # whatever model a request names (OpenAI clients send one)
        log(f"serving {name} at http://{host}:{port}/v1 (OpenAI's API); Ctrl-C stops")
        # run()'s body, for its handler: mlx-lm 0.32's run() does not pass on a handler_class.
        generator = server.ResponseGenerator(provider, server.LRUPromptCache(provider.cli_args.prompt_cache_size))
        server._run_http_server(host, port, generator, handler_class=refusing_empty_prompts(server.APIHandler))

    from .session import PREFILL_STEP

    server.run, sys.argv = run, ["mlx_linear serve", "--host", host, "--port", str(port), "--max-tokens", str(max_tokens),
                                 "--prefill-step-size", str(PREFILL_STEP), *server_options]
    try:
        server.main()
    finally:
        server.run = serve_http


def refusing_empty_prompts(handler):
    """mlx-lm's request handler, answering 400 to a request with nothing to prompt the model with:
    mlx-lm's generation thread raises on an empty prompt, and that thread serves every request."""

    class Handler(handler):
        def validate_model_parameters(self):
            super().validate_model_parameters()
            if self.path == "/v1/completions" and not self.body.get("prompt"):
                raise ValueError("the prompt is empty: give some text to complete")
            if self.path.endswith("/chat/completions") and not self.body.get("messages"):
                raise ValueError("messages is empty: give at least one message")

    return Handler


def check_port(host, port):
    """A one-line error, before the model loads, where the address is taken (else mlx-lm's
    server fails once its generation thread has started, and never exits)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port, or stop what uses it") from e

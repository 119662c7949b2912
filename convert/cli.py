"""`mlx_linear convert`."""

import click

import json

from mlx_linear.cli import log
from mlx_linear.errors import UserError
from mlx_linear.methods import METHODS


def parse_options(pairs):
    """["normalize=true", "scale=0.5"] -> {"normalize": True, "scale": 0.5}; values as JSON, else text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--method-option {pair!r}: write KEY=VALUE, e.g. normalize=true")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@click.command()
@click.option("--hf", "hf_source", help="Hugging Face hub id or local folder (config.json + safetensors).")
@click.option("--gguf", type=click.Path(dir_okay=False), help="GGUF file (F32/F16/Q8_0/Q4_0/Q4_1).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--method", default="liger-gla", show_default=True, type=click.Choice(["none", *sorted(METHODS)]))
@click.option("--window", default=64, show_default=True, type=click.IntRange(1), help="Sliding-window size.")
@click.option("--sinks", default=0, show_default=True, type=click.IntRange(0),
              help="First tokens every query also attends (attention sinks; kept in the cache).")
@click.option("--sink-horizon", default=0, show_default=True, type=click.IntRange(0),
              help="Past this position queries read the sinks from it, before it at their true distance "
                   "(e.g. the model's context - 1); 0: window + sinks - 1 (StreamingLLM's).")
@click.option(
    "--full-attention-every", default=0, type=click.IntRange(0), help="Keep every N-th layer as softmax (Liger-H)."
)
@click.option("--method-option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A method option, e.g. normalize=true (repeatable).")
@click.option("--quantize", is_flag=True, help="Quantize the linear layers with mlx-lm (QLoRA-ready).")
@click.option("--q-bits", default="4", show_default=True, type=click.Choice(["2", "3", "4", "5", "6", "8"]))
@click.option("--q-group-size", default="64", show_default=True, type=click.Choice(["32", "64", "128"]))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Stored dtype [source's].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def convert(hf_source, gguf, output, method, window, sinks, sink_horizon, full_attention_every, method_options, quantize, q_bits,
            q_group_size, dtype, force):
    """Convert a checkpoint; with no --hf/--gguf, the bundled SmolLM2-135M-Instruct."""
    import mlx.core as mx

    from .convert import convert as run

    run(
        output,
        hf_source=hf_source,
        gguf=gguf,
        method=method,
        window=window,
        sinks=sinks,
        sink_horizon=sink_horizon,
        full_attention_every=full_attention_every,
        options=parse_options(method_options),
        quantize=quantize,
        q_bits=int(q_bits),
        q_group_size=int(q_group_size),
        dtype=getattr(mx, dtype) if dtype else None,
        force=force,
        log=log,
    )

"""The models the decode benchmarks run: the bundled SmolLM2 as the chat runs it by default,
the same with the plain (uncompiled) decode step, the paper's recipe, the chat's model in 4
bits (dequantized at load on the CPU, or kept quantized), and the original transformer."""

import json
import sys
from pathlib import Path

import mlx_linear
from mlx_linear.chat.model import CONVERSION_FILE, bundled_adapter
from mlx_linear.convert import bundled_model

DESCRIPTIONS = {
    "chat": "chat default (the packaged adapter)",
    "chat-plain": "chat default, plain decode step",
    "paper": "Liger-GLA (paper's recipe)",
    "chat-4bit": "chat default, 4-bit (dequantized at load)",
    "chat-4bit-kept": "chat default, 4-bit (kept quantized)",
    "none": "original (mlx-lm)",
}


def log(message):
    print(message, file=sys.stderr)


def load_bench_model(name):
    """(model, tokenizer) for one of DESCRIPTIONS."""
    if name in ("paper", "none"):
        return mlx_linear.load(bundled_model("liger-gla" if name == "paper" else "none", log=log))
    adapter = bundled_adapter()
    conversion = json.loads(Path(adapter, CONVERSION_FILE).read_text())
    folder = bundled_model(log=log, quantize=name.startswith("chat-4bit"), **conversion)
    model, tokenizer = mlx_linear.load(folder, adapter_path=adapter, dequantize=name != "chat-4bit-kept", fuse_adapter=True)
    model.compile_decode = name != "chat-plain"
    return model, tokenizer

"""Which model the chat runs: a converted folder, or the bundled SmolLM2 and its trained adapter."""

import hashlib
import importlib.resources
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_linear import load
from mlx_linear.adapters import ADAPTER_FILE, CONFIG_FILE
from mlx_linear.convert import bundled_model

# Package data: the LoRA adapter this project trained for the bundled model, and the
# `convert` options (method, sinks, method options) of the model it was trained on.
BUNDLED_ADAPTER = "smollm2-135m-instruct-lola"
CONVERSION_FILE = "conversion.json"
NO_ADAPTER_NOTE = (
    "note: the trained adapter for the bundled SmolLM2 is missing from this install, so the untrained "
    "linearized model talks nonsense: reinstall mlx-linear, or pass --adapter with one from `mlx_linear lora-train`"
)


def bundled_adapter(name=BUNDLED_ADAPTER):
    """The packaged adapter folder, or None when this release ships none."""
    folder = Path(str(importlib.resources.files("mlx_linear") / "trained_adapters" / name))
    if all((folder / f).is_file() for f in (CONFIG_FILE, ADAPTER_FILE, CONVERSION_FILE)):
        return folder
    return None


def load_chat_model(model=None, adapter=None, log=print, dequantize="auto"):
    """(model, tokenizer, name); no `model`: the bundled SmolLM2, converted once, with its adapter.
    `dequantize`: see mlx_linear.utils.dequantizes."""
    if model is None:
        if adapter is None:
            adapter = bundled_adapter()
            if adapter is None:
                log(NO_ADAPTER_NOTE)
        conversion_file = Path(adapter or "", CONVERSION_FILE)
        conversion = json.loads(conversion_file.read_text()) if adapter and conversion_file.is_file() else {}
        model = bundled_model(log=log, **conversion)
    name = Path(model).name + (f" + {Path(adapter).name}" if adapter else "")
    return (*load(model, adapter_path=adapter, dequantize=dequantize, fuse_adapter=True), name)


def fingerprint(model, samples=256) -> str:
    """Which model a state fits: a hash of its config (window, method ...) and its weights
    (names, shapes, a strided sample of values, as float32: the dtype they run in may differ)."""
    digest = hashlib.sha256(repr(getattr(model, "args", "")).encode())
    for name, p in sorted(tree_flatten(model.parameters())):
        flat = p.reshape(-1)
        sample = flat[:: max(1, flat.size // samples)].astype(mx.float32)
        digest.update(f"{name}{p.shape}".encode())
        digest.update(memoryview(mx.contiguous(sample)))
    return digest.hexdigest()[:32]

"""Converted model folders: loading them (float32 on the CPU) and writing them (convert, fuse)."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer, save_config, save_model

from . import __version__
from .errors import UserError
from .files import atomic_output, read_safetensors
from .output_checks import MARK, check_free_space, disk_full_error
from .model import Model, ModelArgs, base_architecture


def compute_dtype():
    """float32 on the CPU (half-precision matmul there is ~40x slower); None keeps the stored dtype."""
    return None if mx.default_device() == mx.gpu else mx.float32


def cast_floats(model: nn.Module, dtype):
    def cast(x):
        return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map(cast, model.parameters()))


def get_model_classes(config: dict):
    if config.get("linearization"):
        return Model, ModelArgs
    arch = base_architecture(config["model_type"])
    return arch.Model, arch.ModelArgs


def read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a converted model (no config.json): run `mlx_linear convert -o {path}` first")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e}): convert the model again") from e


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable on Linux, else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(path, model, config, dtype):
    """Refuse, before reading a byte, a model that in `dtype` would swap or be killed."""
    def size(x):
        return x.size * dtype.size if dtype is not None and mx.issubdtype(x.dtype, mx.floating) else x.nbytes

    needed = sum(size(x) for _, x in tree_flatten(model.parameters()))
    free = available_memory()
    if needed > free:
        fix = "a smaller model" if "quantization" in config else "convert it with --quantize (4-bit, ~1/7 the size)"
        raise UserError(f"{path} needs {needed / 1e9:.1f} GB as {str(dtype or 'stored').split('.')[-1]} and this machine "
                        f"has {free / 1e9:.1f} GB available: use {fix}")


def dequantizes(model, dtype, dequantize) -> bool:
    """dequantize="auto": a quantized model runs in float on the CPU when that fits in memory
    (MLX's CPU quantized matmul is ~30x slower than float32 BLAS), stays quantized on a GPU."""
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if dequantize != "auto" or not quantized:
        return bool(dequantize) and bool(quantized)
    float_bytes = sum(m.weight.size * (32 // m.bits) * (dtype or mx.float32).size for m in quantized)
    return dtype is not None and float_bytes < available_memory() / 2


def load(path, adapter_path=None, dtype="auto", lazy=False, dequantize="auto", fuse_adapter=False):
    """(model, tokenizer) for a folder written by `mlx_linear convert` (any method);
    `dequantize` (True, False, "auto"): see dequantizes(). `fuse_adapter`: for generation, the
    adapter's LoRA layers merged into float weights (a model to train keeps them apart)."""
    path = Path(path)
    config = read_config(path)
    try:
        base_architecture(config.get("model_type", "?"))
        model, config = load_model(path, lazy=True, model_config={"model_file": None}, get_model_classes=get_model_classes)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {path}: {e}") from e
    except RuntimeError as e:  # a damaged weights file: say which
        for weights_file in sorted(path.glob("*.safetensors")):
            read_safetensors(weights_file, "convert the model again")
        raise UserError(f"cannot load {path}: {e}") from e
    if adapter_path is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter_path)
    dtype = compute_dtype() if dtype == "auto" else dtype
    check_fits_in_memory(path, model, config, dtype)
    if dtype is not None:
        cast_floats(model, dtype)
    if dequantizes(model, dtype, dequantize):
        dequantize_model(model)  # after the cast: float32 scales give float32 weights
    if adapter_path is not None and fuse_adapter:
        from .adapters import fuse_lora

        fuse_lora(model, quantized=False)
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


MODEL_FILE = "mlx_linear_model.py"
MODEL_FILE_SOURCE = '''"""Written by mlx-linear: lets stock mlx-lm load this folder (--trust-remote-code)."""

from mlx_linear.model import Model, ModelArgs  # noqa: F401
'''


def materialize(model):
    """Compute the output one layer at a time: each layer's source tensors are read, cast or
    quantized, and freed before the next layer's are read (saving all at once reads them all)."""
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def write_model(output, model, config, tokenizer, force=False, source_folder=None):
    """An MLX model folder (weights, config, tokenizer, model_file), complete or not at all."""
    output = Path(output).resolve()  # `-o .` has no name to put a temporary folder beside
    check_free_space(output, sum(w.nbytes for _, w in tree_flatten(model.parameters())))
    materialize(model)
    try:
        with atomic_output(output, force) as tmp:
            save_model(tmp, model, donate_model=True)
            if config.get("linearization"):
                config["model_file"] = MODEL_FILE
                (tmp / MODEL_FILE).write_text(MODEL_FILE_SOURCE)
            save_config({**config, MARK: __version__}, tmp / "config.json")
            tokenizer.save_pretrained(str(tmp))
            if source_folder is not None and (Path(source_folder) / "generation_config.json").is_file():
                shutil.copy(Path(source_folder) / "generation_config.json", tmp)
    except OSError as e:
        raise disk_full_error(output, e) from None

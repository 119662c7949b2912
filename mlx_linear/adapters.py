"""LoRA adapters: which layers get them, and their files (mlx-lm's adapter format).

Method parameters (a method's feature maps or mixing weights, when it has any) train and
save along with the LoRA weights.
"""

import json
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import UserError
from .files import read_safetensors, save_safetensors, write_json

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
TARGETS = {
    "q": ["self_attn.q_proj"],
    "k": ["self_attn.k_proj"],
    "v": ["self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def check_targets(targets):
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise UserError(f"unknown LoRA targets {sorted(unknown)}: choose from {', '.join(TARGETS)}, e.g. --lora-targets q,k,v")


def lora_config(model, rank=8, scale=1.0, dropout=0.0, targets=("q", "k", "v")):
    check_targets(targets)
    keys = [key for t in targets for key in TARGETS[t]]
    return {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys},
    }


def apply_lora(model: nn.Module, config: dict):
    """Freeze the model, then add trainable LoRA layers (and unfreeze method parameters)."""
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    for layer in model.layers:
        method = getattr(layer.self_attn, "method", None)
        if method is not None:
            method.unfreeze()
    return model


def adapter_weights(model):
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(folder, model, config, name=ADAPTER_FILE):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / name, adapter_weights(model))
    write_json(folder / CONFIG_FILE, config)


def read_adapter_config(folder) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an adapter folder (no {CONFIG_FILE}): pass the -o of `mlx_linear lora-train`")
    try:
        config = json.loads(path.read_text())
        rank, _, _, keys = (config["lora_parameters"][k] for k in ("rank", "scale", "dropout", "keys"))
        if not (isinstance(config["num_layers"], int) and isinstance(rank, int) and all(isinstance(k, str) for k in keys)):
            raise TypeError("num_layers, rank or keys has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        problem = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise UserError(f"{path} {problem}: restore it from the run that wrote it (lora-train rewrites it)") from None
    return config


def load_adapter(model, folder, name=ADAPTER_FILE):
    """Add the adapter's LoRA layers to `model` and load its weights."""
    apply_lora(model, read_adapter_config(folder))
    return load_adapter_weights(model, folder, name)


def fuse_lora(model, dequantize=False, quantized=True) -> int:
    """Merge every LoRA layer into its base weight (one matmul a layer instead of three);
    `quantized=False` leaves those on quantized weights, which merging would re-quantize."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if hasattr(m, "fuse") and (quantized or not isinstance(m.linear, nn.QuantizedLinear))]
    model.update_modules(tree_unflatten(fused))
    return len(fused)


def read_adapter_weights(folder, name=ADAPTER_FILE) -> dict:
    """An adapter folder's weights by name; a one-line error where the file is missing or damaged."""
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"{path} is missing: the training run saved no adapter yet")
    return read_safetensors(path, "copy the adapter again, or train it again")


def load_adapter_weights(model, folder, name=ADAPTER_FILE):
    """Load an adapter's weights into a model that already has its LoRA layers (any subset)."""
    path = Path(folder) / name
    weights = read_adapter_weights(folder, name)
    expected = adapter_weights(model)
    unknown = [k for k in weights if k not in expected]
    if unknown:
        raise UserError(f"{path} does not fit this model ({unknown[0]} has no place in it): use the model it was trained on")
    model.load_weights(list(weights.items()), strict=False)
    return model

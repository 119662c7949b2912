"""Merge a LoRA adapter into a standalone converted model folder."""

from mlx_lm.utils import dequantize_model

from ..adapters import fuse_lora
from ..output_checks import prepare_model_output
from ..utils import load, read_config, write_model


def fuse(model_path, adapter_path, output, dequantize=False, force=False, log=print):
    output = prepare_model_output(output, force, sources=(model_path, adapter_path))
    config = read_config(model_path)
    model, tokenizer = load(model_path, adapter_path=adapter_path, dtype=None)
    fused = fuse_lora(model, dequantize)
    if dequantize and "quantization" in config:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config.pop("model_file", None)
    log(f"fused {fused} LoRA layers; writing {output}")
    write_model(output, model, config, tokenizer, force, model_path)
    return output

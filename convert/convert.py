"""Checkpoint (HF folder, hub id or GGUF) -> MLX folder with linearized attention."""

import inspect
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from mlx_linear.errors import UserError
from mlx_linear.methods import METHODS
from mlx_linear.model import Linearization, base_architecture
from mlx_linear.output_checks import prepare_model_output
from mlx_linear.utils import get_model_classes, write_model

from . import hf
from .bundled import bundled_gguf
from .gguf import read_gguf



def read_source(hf_source=None, gguf=None, log=print):
    """(config, weights, tokenizer, dtype, source folder or None)."""
    if hf_source and gguf:
        raise UserError("pass either --hf or --gguf, not both")
    if hf_source:
        folder = hf.resolve(hf_source)
        config, weights, tokenizer, dtype = hf.read_hf(folder)
        return (*base_of_converted(folder, config, weights, log), tokenizer, dtype, folder)
    config, weights, tokenizer = read_gguf(gguf or bundled_gguf())
    return config, weights, tokenizer, mx.float16, None


def base_of_converted(folder, config, weights, log):
    """A folder this tool converted holds the original's weights: strip its linearization (and
    its method's own parameters) so the conversion asked for starts from the original."""
    if "quantization" in config:
        raise UserError(f"{folder} is quantized: convert the original (unquantized) checkpoint instead")
    if not config.pop("linearization", None):
        return config, weights
    config.pop("model_file", None)
    log(f"{folder} was converted before: starting again from its original weights (method parameters dropped)")
    return config, {k: w for k, w in weights.items() if ".method." not in k}


def check_group_size(model, group_size):
    """mlx-lm leaves a layer whose input width the group size does not divide in float, silently."""
    wanted = getattr(model, "quant_predicate", lambda path, module: True)
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and wanted(path, module) and module.weight.shape[-1] % group_size:
            raise UserError(
                f"--q-group-size {group_size} does not divide the input width {module.weight.shape[-1]} of {path}: "
                "choose a group size that divides it (32 or 64)"
            )


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def method_options(cls):
    """A method's options by name: its constructor's keywords, and its parent's where it passes
    **options on (LoLA takes LoLCATs' options)."""
    parameters = {}
    for klass in cls.__mro__:
        own = inspect.signature(klass).parameters.values()
        parameters.update({p.name: p for p in own if p.name != "attention" and p.kind != p.VAR_KEYWORD})
        if not any(p.kind == p.VAR_KEYWORD for p in own):
            return parameters


def check_options(method, options):
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of none, {', '.join(sorted(METHODS))}")
    parameters = method_options(METHODS[method])
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise UserError(f"method {method} has no option {unknown[0]!r}; its options: {', '.join(parameters) or 'none'}")
    for name, value in options.items():
        # An option takes the type of its default: true/false for a flag, a number for a number.
        default = parameters[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"method {method} option {name}={value!r}: give true or false, e.g. {name}=true")
        if is_number(default) and not is_number(value):
            raise UserError(f"method {method} option {name}={value!r}: give a number, e.g. {name}={default}")


def check_sink_horizon(sink_horizon, window, sinks):
    """Sinks read from nearer than StreamingLLM's row would have left the window's trained range."""
    if sink_horizon and not sinks:
        raise UserError(f"--sink-horizon {sink_horizon} needs sinks: add --sinks N (e.g. 4), or drop --sink-horizon")
    if 0 < sink_horizon < window + sinks - 1:
        raise UserError(f"--sink-horizon {sink_horizon} is inside the window: give 0 or at least window + sinks - 1 "
                        f"({window + sinks - 1})")


def build_model(config, weights):
    try:
        base_architecture(config.get("model_type", "?"))
    except ValueError as e:
        raise UserError(str(e)) from None
    model_class, args_class = get_model_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except TypeError as e:
        raise UserError(f"config.json lacks a field the {config['model_type']} architecture needs: {e}") from e
    except ValueError as e:
        raise UserError(f"cannot build the model: {e}") from e
    weights = model.sanitize(weights)
    expected = dict(tree_flatten(model.parameters()))
    # A method's own parameters (e.g. mixing weights) start from their initial values.
    missing = [k for k in expected if k not in weights and ".method." not in k]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    for problem, names in (("lacks", missing), ("has unexpected", unexpected), ("has a wrong shape for", wrong)):
        if names:
            raise UserError(
                f"the weights do not fit the {config['model_type']} config: the checkpoint {problem} {names[0]} "
                f"(and {len(names) - 1} more); check config.json against the weights"
            )
    model.load_weights(list(weights.items()), strict=False)
    return model


def convert(
    output,
    hf_source=None,
    gguf=None,
    method="liger-gla",
    window=64,
    sinks=0,
    sink_horizon=0,
    full_attention_every=0,
    options=None,
    quantize=False,
    q_bits=4,
    q_group_size=64,
    dtype=None,
    force=False,
    log=print,
):
    """Write a converted model to `output`; returns its path. `method="none"` keeps softmax."""
    start = time.perf_counter()
    output = prepare_model_output(output, force, sources=(hf_source, gguf))
    if method != "none":  # before the reading, which can take minutes
        check_options(method, options or {})
        check_sink_horizon(sink_horizon, window, sinks)
    log(f"reading {hf_source or gguf or 'the bundled SmolLM2-135M-Instruct GGUF'}")
    config, weights, tokenizer, source_dtype, folder = read_source(hf_source, gguf, log)
    if method != "none":
        config["linearization"] = asdict(Linearization(method, window, sinks, sink_horizon, full_attention_every, options or {}))
    log(f"building {config['model_type']} ({len(weights)} tensors), method {method}")
    model = build_model(config, weights)
    # The model holds what it needs: kept here, every source tensor read while writing would
    # stay in memory to the end (a 7B peaked at 17 GiB instead of 5).
    del weights
    dtype = dtype or source_dtype
    model.set_dtype(dtype)
    config["torch_dtype"] = str(dtype).split(".")[-1]
    if quantize:
        check_group_size(model, q_group_size)
        log(f"quantizing to {q_bits} bits, group size {q_group_size}")
        model, config = quantize_model(model, config, q_group_size, q_bits)
    log(f"writing {output}")
    write_model(output, model, config, tokenizer, force, folder)
    log(f"done in {time.perf_counter() - start:.1f}s: {output}")
    return Path(output)

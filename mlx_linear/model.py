"""A pretrained mlx-lm transformer whose attention layers are linearized.

The base architecture's blocks (mlx_lm.models.llama, qwen2, qwen3) are reused unchanged;
each linearized layer's `self_attn` becomes a LinearizedAttention holding the same weights.
A converted folder's config.json names this module as `model_file`, so stock mlx-lm loads
it with --trust-remote-code.
"""

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
from mlx_lm.tuner.lora import LoRALinear

from . import decode
from .attention import LinearizedAttention
from .batch import BatchLinearCache, LinearCache
from .methods import get_method

# HF model_type -> mlx-lm module providing its blocks.
BASE_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def base_architecture(model_type: str):
    if model_type not in BASE_MODULES:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(BASE_MODULES))}"
        )
    return importlib.import_module(f"mlx_lm.models.{BASE_MODULES[model_type]}")


@dataclass
class Linearization:
    method: str = "liger-gla"
    window: int = 64
    sinks: int = 0  # first tokens every query also attends (StreamingLLM's attention sinks)
    sink_horizon: int = 0  # past it, queries read the sinks from it (0: window + sinks - 1, StreamingLLM's)
    full_attention_every: int = 0  # Liger-H: every N-th layer (N-1, 2N-1, ...) keeps softmax
    options: Dict[str, Any] = field(default_factory=dict)  # method-specific

    def is_linear(self, layer_index: int) -> bool:
        N = self.full_attention_every
        return not (N and (layer_index + 1) % N == 0)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    linearization: Linearization
    config: Dict[str, Any]  # the whole config, for the base architecture's ModelArgs

    @classmethod
    def from_dict(cls, params):
        return cls(params["model_type"], Linearization(**params["linearization"]), params)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        arch = base_architecture(args.model_type)
        base = arch.Model(arch.ModelArgs.from_dict(args.config))
        self.model = base.model
        if hasattr(base, "lm_head"):
            self.lm_head = base.lm_head
        self.base_sanitize = base.sanitize
        lin = args.linearization
        method = get_method(lin.method)
        for i, layer in enumerate(self.layers):
            if lin.is_linear(i):
                attn = layer.self_attn
                layer.self_attn = LinearizedAttention(attn, method, lin.options, lin.window, lin.sinks, lin.sink_horizon)
        self.linear_layers = [lin.is_linear(i) for i in range(len(self.layers))]
        self.full_index = self.linear_layers.index(False) if False in self.linear_layers else None
        self.softmax_everywhere = False
        self.compile_decode = True  # False: every decode step takes the plain path
        self._decode_steps = {}  # decode.step_function(self, kind) by kind, built at the first steady step

    def use_softmax_attention(self, enabled: bool = True):
        """Run every layer as the original softmax attention (the same weights, no cache)."""
        for layer, linear in zip(self.layers, self.linear_layers):
            if linear:
                layer.self_attn.use_softmax = enabled
        self.softmax_everywhere = enabled

    def use_state(self, enabled: bool = True):
        """enabled=False: every linearized layer runs its window branch alone (the state off)."""
        for layer, linear in zip(self.layers, self.linear_layers):
            if linear:
                layer.self_attn.use_state = enabled

    @contextmanager
    def teacher(self, record=None):
        """Run as the original transformer on the same weights: softmax attention, LoRA off.
        With `record` (a list), each linearized layer appends its attention's (input, output)."""
        loras = [m for _, m in self.named_modules() if isinstance(m, LoRALinear)]
        scales = [m.scale for m in loras]
        attentions = [layer.self_attn for layer, linear in zip(self.layers, self.linear_layers) if linear]
        for m in loras:
            m.scale = 0.0
        for attn in attentions:
            attn.recorder = None if record is None else record.append  # a list would become a child module
        self.use_softmax_attention(True)
        try:
            yield attentions
        finally:
            self.use_softmax_attention(False)
            for m, scale in zip(loras, scales):
                m.scale = scale
            for attn in attentions:
                attn.recorder = None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        if input_embeddings is None and self.decodes_compiled(inputs, cache):
            return decode.decode(self, inputs, cache)
        h = self.hidden_states(inputs, cache, input_embeddings)
        if hasattr(self, "lm_head"):
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def decodes_compiled(self, inputs, cache) -> bool:
        """Whether this call is a decode step the compiled function takes (see decode.py)."""
        if not self.compile_decode or cache is None or inputs.shape[1] != 1 or not all(self.linear_layers):
            return False
        if self.softmax_everywhere or not all(map(decode.is_steady, cache)):
            return False
        # Flags the step reads as Python values when traced: other settings take the plain path.
        if not all(layer.self_attn.use_state and not layer.self_attn.use_softmax for layer in self.layers):
            return False
        if isinstance(cache[0], BatchLinearCache):
            return True
        windows = [c.caches[1] for c in cache]
        return len({(w.offset, w._idx) for w in windows}) == 1

    def hidden_states(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        """The last layer's normalised output, before the LM head."""
        h = input_embeddings if input_embeddings is not None else self.model.embed_tokens(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = None
        if self.softmax_everywhere:
            mask = create_attention_mask(h, None)
        elif self.full_index is not None:
            mask = create_attention_mask(h, cache[self.full_index])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.model.norm(h)

    def sanitize(self, weights):
        return self.base_sanitize(weights)

    @property
    def layers(self):
        return self.model.layers

    @property
    def quant_predicate(self):
        # Method parameters (feature maps, mixing weights) stay in float.
        return lambda path, module: ".method." not in path

    def make_cache(self):
        if self.softmax_everywhere:
            return [KVCache() for _ in self.layers]
        lin = self.args.linearization
        return [
            LinearCache(ArraysCache(layer.self_attn.method.state_size),
                        RotatingKVCache(max_size=lin.window + lin.sinks, keep=lin.sinks))
            if linear
            else KVCache()
            for layer, linear in zip(self.layers, self.linear_layers)
        ]


def load_adapters_in_mlx_lm():
    """mlx-lm's adapter loading accepts only LoRA leaves (lora_a, lora_b, m); a linearized
    model's adapter also carries its method's parameters, so mlx-lm (`generate --adapter-path`,
    `server`) loads those models' adapters the way mlx-linear does."""
    import mlx_lm.utils

    stock = mlx_lm.utils.load_adapters
    if getattr(stock, "loads_linearized", False):
        return

    def load_adapters(model, adapter_path):
        if not isinstance(model, Model):
            return stock(model, adapter_path)
        from .adapters import load_adapter

        return load_adapter(model, adapter_path)

    load_adapters.loads_linearized = True
    mlx_lm.utils.load_adapters = load_adapters


load_adapters_in_mlx_lm()

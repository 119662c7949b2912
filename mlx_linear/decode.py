"""A compiled decode step: one token through every layer as a single mx.compile'd function.

Once every window cache is full its shapes stop changing, so the step can take the cache's
arrays (scan states, ring buffers), the position and the ring buffer's write slot as inputs
and return the new ones: traced once, it then runs without Python building the graph or
MLX's small elementwise ops each running alone. Each attention's `decode_step` is the math;
this module moves arrays between mlx-lm's cache objects and the compiled function. In a batch
(batch.py) the position and slot are arrays of one per row. Caches it does not handle (growing
KV caches, a window not yet full) take the plain path.
"""

from functools import partial

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache

from .batch import BatchLinearCache


class StepCache:
    """One layer's cache inside the compiled step: arrays only, no Python positions. `rotation`:
    RoPE at the step's position (rotary.Rotation, or None), computed once for every layer, and
    `sink_rotation` the sinks' (attention.sink_rotation); `kind`: the method's kind of step (LoLA's
    block boundaries), a Python value fixed at tracing."""

    def __init__(self, state, keys, values, offset, slot, rotation=None, kind=None, sink_rotation=None):
        self.state, self.keys, self.values, self.offset, self.slot = state, keys, values, offset, slot
        self.rotation, self.kind, self.sink_rotation = rotation, kind, sink_rotation

    def write(self, k, v):
        self.keys, self.values = write_at(self.keys, k, self.slot), write_at(self.values, v, self.slot)


def write_at(buffer, x, index):
    """x (B, H, 1, d) written into buffer (B, H, N, d) at `index` on axis 2: one index (0-d) for
    every row, or one a row ((B, 1, 1, 1): a batch of sequences at their own positions)."""
    if index.ndim == 0:
        return mx.slice_update(buffer, x.astype(buffer.dtype), index, axes=(2,))
    return mx.where(mx.arange(buffer.shape[2])[:, None] == index, x.astype(buffer.dtype), buffer)


def is_steady(layer_cache) -> bool:
    """A linear layer's cache whose window is full and state started (in a batch: every row's)."""
    if isinstance(layer_cache, BatchLinearCache):
        return layer_cache.lengths is None and all(map(layer_cache.steady, range(len(layer_cache.offsets))))
    if not isinstance(layer_cache, CacheList) or len(layer_cache.caches) != 2:
        return False
    state, window = layer_cache.caches
    return (
        type(state) is ArraysCache and type(window) is RotatingKVCache
        and state.left_padding is None and state.lengths is None and state.cache[0] is not None
        and window.keys is not None and window.keys.shape[2] == window.max_size
        and window.offset >= window.max_size and window.keep <= window._idx <= window.max_size
    )


def write_slot(window: RotatingKVCache) -> int:
    """Where RotatingKVCache's next single-token update writes (past the `keep` sinks)."""
    return window.keep if window._idx == window.max_size else window._idx


def flat_arrays(cache):
    return [(list(c.caches[0].cache), c.caches[1].keys, c.caches[1].values) for c in cache]


def step_kind(model, offset):
    """The kind of step the token at `offset` takes (one compiled function each)."""
    return model.layers[0].self_attn.method.step_kind(offset)


def step_function(model, kind=None):
    """model's compiled step of `kind`: (tokens, offset, slot, per-layer (state, keys, values)) ->
    (logits, new per-layer arrays). Its parameters are inputs, so updated weights are seen."""

    @partial(mx.compile, inputs=model.state)
    def step(tokens, offset, slot, arrays):
        return run_step(model, tokens, offset, slot, arrays, kind)

    return step


def run_step(model, tokens, offset, slot, arrays, kind=None):
    """The step's function (compiled by step_function): the step's RoPE once for every layer."""
    attention = model.layers[0].self_attn  # every layer's RoPE and sinks are the same
    rotation = attention.rotary.at(offset) if attention.rotary is not None else None
    sinks = attention.sink_rotation(offset, rotation)
    caches = [StepCache(state, keys, values, offset, slot, rotation, kind, sinks) for state, keys, values in arrays]
    logits = model(tokens, cache=caches)
    return logits, [(c.state, c.keys, c.values) for c in caches]


def decode(model, tokens, cache):
    """Run the compiled step on the caches' arrays and store what it returns back into them."""
    if isinstance(cache[0], BatchLinearCache):
        return decode_batch(model, tokens, cache)
    window = cache[0].caches[1]
    kind = step_kind(model, window.offset)
    if kind not in model._decode_steps:
        model._decode_steps[kind] = step_function(model, kind)
    step = model._decode_steps[kind]
    slot = write_slot(window)
    logits, arrays = step(tokens, mx.array(window.offset), mx.array(slot), flat_arrays(cache))
    for layer_cache, (state, keys, values) in zip(cache, arrays):
        state_cache, window = layer_cache.caches
        state_cache.cache = list(state)
        window.keys, window.values = keys, values
        window.offset += tokens.shape[1]
        window._idx = slot + 1
    return logits


def decode_batch(model, tokens, cache):
    """The compiled step for mlx-lm's batches (batch.BatchLinearCache), each row at its own
    position and ring slot; LoLA's block boundaries, at their own steps, are taken first."""
    for layer, layer_cache in zip(model.layers, cache):
        layer_cache.start_steps(layer.self_attn.method)
    if "batch" not in model._decode_steps:
        model._decode_steps["batch"] = step_function(model)
    offset, slot = cache[0].positions()
    logits, arrays = model._decode_steps["batch"](tokens, offset, slot, [c.rows_of(None) for c in cache])
    for layer_cache, (state, keys, values) in zip(cache, arrays):
        layer_cache.put_rows(None, state, keys, values)
    return logits

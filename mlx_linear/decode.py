"""A compiled decode step: one token through every layer as a single mx.compile'd function.

Once every window cache is full its shapes stop changing, so the step can take the cache's
arrays (scan states, ring buffers), the position and the ring buffer's write slot as inputs
and return the new ones: traced once, it then runs without Python building the graph or
MLX's small elementwise ops each running alone. Each attention's `decode_step` is the math;
this module moves arrays between mlx-lm's cache objects and the compiled function. Caches
it does not handle (batched, growing KV caches, a window not yet full) take the plain path.
"""

from functools import partial

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache


class StepCache:
    """One layer's cache inside the compiled step: arrays only, no Python positions."""

    def __init__(self, state, keys, values, offset, slot):
        self.state, self.keys, self.values, self.offset, self.slot = state, keys, values, offset, slot

    def write(self, k, v):
        self.keys = mx.slice_update(self.keys, k, self.slot, axes=(2,))
        self.values = mx.slice_update(self.values, v, self.slot, axes=(2,))


def is_steady(layer_cache) -> bool:
    """A plain (unbatched) linear layer's cache whose window is full and state started."""
    if type(layer_cache) is not CacheList or len(layer_cache.caches) != 2:
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


def step_function(model):
    """model's compiled step: (tokens, offset, slot, per-layer (state, keys, values)) ->
    (logits, new per-layer arrays). Its parameters are inputs, so updated weights are seen."""

    @partial(mx.compile, inputs=model.state)
    def step(tokens, offset, slot, arrays):
        caches = [StepCache(state, keys, values, offset, slot) for state, keys, values in arrays]
        logits = model(tokens, cache=caches)
        return logits, [(c.state, c.keys, c.values) for c in caches]

    return step


def decode(model, step, tokens, cache):
    """Run `step` on the caches' arrays and store what it returns back into them."""
    window = cache[0].caches[1]
    slot = write_slot(window)
    logits, arrays = step(tokens, mx.array(window.offset), mx.array(slot), flat_arrays(cache))
    for layer_cache, (state, keys, values) in zip(cache, arrays):
        state_cache, window = layer_cache.caches
        state_cache.cache = list(state)
        window.keys, window.values = keys, values
        window.offset += tokens.shape[1]
        window._idx = slot + 1
    return logits

"""LoLA (arXiv 2505.23666): LoLCATs with a sparse cache. Of the keys and values that have left
the window, the `slots` per KV head that the linear state recalls worst (by self-recall error,
|| phi(k) S / phi(k) z - v ||^2) are kept exact and attended beside the window, under LoLCATs'
shared denominator; the rest enter S and z as before. The cache has a fixed size, so memory is
still constant; a key more than `horizon` tokens back leaves it for the state (else, read from a
fixed distance, stale keys pile up in long streams). It is an inference-time change: a LoLCATs
adapter loads as it is (the same parameters), and LoLCATs' options apply. The math, its state and its blocks are in sparse.py.
"""

import mlx.core as mx

from .. import sparse
from . import register
from .lolcats import LoLCATs


@register
class LoLA(LoLCATs):
    name = "lola"
    state_size = 8  # S; the last two blocks' raw keys, values, features; the cache's, and its positions

    def __init__(self, attention, slots=64, horizon=2048, **options):
        super().__init__(attention, **options)
        self.check_options((slots in range(1, 4097), f"slots={slots}: give a whole number of cached keys per KV head, 1 to 4096"),
                           (horizon in range(1 << 31), f"horizon={horizon}: give a whole number of tokens (0: none)"))
        self.slots, self.horizon, self.scale, self.sinks = int(slots), int(horizon), attention.scale, attention.sinks

    def step_kind(self, offset):
        return offset % self.window == 0  # a block boundary (choosing the cache) is a step of its own

    def __call__(self, q, k, v, rope, state=None):
        q_features, k_features, _ = self.feature_maps(q, k, v, rope)
        return sparse.forward(self, q, k, v, q_features, k_features, rope, state)

    def start_step(self, state, offset):
        return sparse.shift_blocks(self, state, offset)

    def step(self, attention, q, k, v, rope, cache):
        return sparse.step(self, attention, q, k, v, rope, cache)

    def mix(self, linear, window, window_mass=None):
        if window_mass is None:
            raise ValueError("lola needs the window's softmax mass")
        return sparse.combine(linear, window, window_mass, mx.sigmoid(self.window_logit))

"""LoLA (arXiv 2505.23666): LoLCATs with a sparse cache. Of the keys and values that have left
the window, the `slots` per KV head that the linear state recalls worst (by self-recall error,
|| phi(k) S / phi(k) z - v ||^2) are kept exact and attended beside the window, under LoLCATs'
shared denominator; the rest enter S and z (the sinks only with `sinks_in_state`: the window reads
them). The cache has a fixed size, read in the order of positions just beyond the window. A key
more than `horizon` tokens back leaves it (stale keys pile up in long streams) unless among the
`long_slots` best ranked of those; `cache_half_life` decays a key's rank with its age; with
`cache_unique` (a cosine), a key with a better-ranked copy leaves. An inference-time change: a
LoLCATs adapter loads as it is. The math, its state and its blocks are in sparse.py.
"""

import math

import mlx.core as mx
import numpy as np

from .. import sparse
from . import register
from .lolcats import LoLCATs


@register
class LoLA(LoLCATs):
    name = "lola"
    state_size = 8  # S; the last two blocks' raw keys, values, features; the cache's, and its positions

    def __init__(self, attention, slots=64, horizon=2048, long_slots=0, cache_half_life=0.0, cache_span=64, cache_unique=0.0,
                 sinks_in_state=True, **options):
        super().__init__(attention, **options)
        self.check_options((slots in range(1, 4097), f"slots={slots}: give a whole number of cached keys per KV head, 1 to 4096"),
                           (horizon in range(1 << 31), f"horizon={horizon}: give a whole number of tokens (0: none)"),
                           (long_slots in range(4097) and long_slots <= slots,
                            f"long_slots={long_slots}: give a whole number of slots, 0 to slots ({slots})"),
                           (cache_half_life >= 0, f"cache_half_life={cache_half_life}: give a number of tokens (0: none)"),
                           (cache_span in range(4097), f"cache_span={cache_span}: give a whole number of positions, 0 to 4096"),
                           (0 <= cache_unique < 1, f"cache_unique={cache_unique}: give a cosine, 0 (off) to below 1"),
                           (isinstance(sinks_in_state, bool), f"sinks_in_state={sinks_in_state}: give true or false"))
        self.slots, self.horizon, self.scale, self.sinks = int(slots), int(horizon), attention.scale, attention.sinks
        self.long_slots = int(long_slots)  # of the keys past the horizon, the best ranked few may stay
        self.age_decay = -math.log(2) / cache_half_life if cache_half_life else 0.0  # rank halves per half-life of age
        self.unique = float(cache_unique)  # a key with a better-ranked copy (both cosines above it) leaves
        self.sinks_in_state = sinks_in_state  # False: the window alone reads the sinks
        # The cache in order over cache_span positions (slot j at j span / slots), read from 2C + span.
        self.cache_span = int(cache_span)
        self.slot_rows = np.arange(self.slots) * self.cache_span // self.slots
        self.far_row = 2 * self.window + self.cache_span
        self.fixed_rows = self.far_row + 1

    @property
    def cache_rule(self):
        """sparse.boundary's arguments after the start: how the cache is chosen."""
        return self.sinks, self.log_decay, self.horizon, self.age_decay, self.unique, self.long_slots, self.sinks_in_state

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

"""Batched generation for mlx-lm (batch_generate, BatchGenerator, mlx_lm.server): the cache of
a linearized layer for many sequences at once, each row exactly its own sequence.

mlx-lm batches a model by merging the sequences' per-layer caches (`merge`), then extends,
filters and extracts rows as requests come and go. A row here is a recurrent state and a ring
of the window's keys, sinks first; rows at different positions differ only in their ring slot,
their RoPE and LoLA's block phase, which a decode step takes per row. So nothing is padded: a
prompt goes row by row through the one-sequence path (prefill is compute-bound, and padding
would enter a recurrent state), as does a row whose window is not yet full; the rows whose
window is full decode together (attention.py, decode.py).

The ring's layout: the token at position p sits at slot `ring_slot(p)`: in order until the
ring is full, then in turn past the sinks, so a row's next slot is a function of its position.
"""

import mlx.core as mx
import mlx_lm.models.cache
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache, _BaseCache


class LinearCache(CacheList):
    """One sequence's cache of a linearized layer, (state, window) as mlx-lm's CacheList; its
    batch is a BatchLinearCache."""

    @classmethod
    def merge(cls, caches):
        return BatchLinearCache.merge(caches)


# mlx-lm restores saved caches by class name from its cache module (load_prompt_cache).
mlx_lm.models.cache.LinearCache = LinearCache


def ring_slot(position, keep, window):
    return position if position < keep else keep + (position - keep) % window


class BatchLinearCache(_BaseCache):
    def __init__(self, max_size, keep, batch_size, state_size):
        self.max_size, self.keep, self.window, self.state_size = max_size, keep, max_size - keep, state_size
        self.offsets = [0] * batch_size  # each row's position; 0: an empty row, whatever its arrays hold
        self.recurrent, self.keys, self.values = None, None, None  # (B, ...) each, from the first row that has them
        self.lengths = None  # each row's tokens left in the prompt being processed (right padding after them)

    @classmethod
    def merge(cls, caches):
        state, window = caches[0].caches
        batch = cls(window.max_size, window.keep, len(caches), len(state.cache))
        for row, cache in enumerate(caches):
            batch.set_row(row, cache)
        return batch

    def steady(self, row):
        """Whether the row's window is full: it decodes with the others."""
        return self.offsets[row] >= self.max_size

    def set_row(self, row, cache):
        """Store one sequence's LinearCache (or CacheList) as row `row`."""
        state, window = cache.caches
        self.offsets[row] = window.offset
        if window.offset == 0:
            return
        keys, values = (self.to_ring(window._temporal_order(x), window.offset) for x in (window.keys, window.values))
        if self.recurrent is None:
            self.recurrent = [None] * len(state.cache)
        arrays = [*self.recurrent, self.keys, self.values]
        for i, x in enumerate([*state.cache, keys, values]):
            if x is None:
                continue
            if arrays[i] is None:
                arrays[i] = mx.zeros((len(self.offsets),) + x.shape[1:], x.dtype)
            arrays[i][row : row + 1] = x
        *self.recurrent, self.keys, self.values = arrays

    def to_ring(self, ordered, offset):
        """A window's keys in temporal order (sinks first) laid out by ring_slot, max_size long."""
        if offset <= self.max_size:
            return mx.pad(ordered, [(0, 0), (0, 0), (0, self.max_size - ordered.shape[2]), (0, 0)])
        recent = mx.roll(ordered[:, :, self.keep :], (offset - self.keep) % self.window, axis=2)
        return mx.concatenate([ordered[:, :, : self.keep], recent], axis=2)

    def extract(self, row):
        """Row `row` as one sequence's LinearCache, its window in temporal order (as after a prompt)."""
        offset, state = self.offsets[row], ArraysCache(self.state_size)
        window = RotatingKVCache(max_size=self.max_size, keep=self.keep)
        if offset and self.recurrent is not None:
            state.cache = [None if x is None else x[row : row + 1] for x in self.recurrent]
        if offset:
            ordered = [self.from_ring(x[row : row + 1], offset) for x in (self.keys, self.values)]
            window.keys, window.values = (mx.contiguous(x) for x in ordered)
            window.offset, window._idx = offset, ordered[0].shape[2]
        return LinearCache(state, window)

    def from_ring(self, ring, offset):
        if offset <= self.max_size:
            return ring[:, :, :offset]
        recent = mx.roll(ring[:, :, self.keep :], -((offset - self.keep) % self.window), axis=2)
        return mx.concatenate([ring[:, :, : self.keep], recent], axis=2)

    def filter(self, rows):
        index = mx.array(rows)
        self.recurrent, self.keys, self.values = self.map_arrays(lambda x: x[index])
        self.offsets = [self.offsets[i] for i in rows]
        self.lengths = None if self.lengths is None else [self.lengths[i] for i in rows]

    def extend(self, other):
        mine, theirs = self.all_arrays(), other.all_arrays()
        arrays = []
        for a, b in zip(mine or [None] * len(theirs), theirs or [None] * len(mine)):
            like = a if a is not None else b
            if like is not None:
                a, b = (x if x is not None else mx.zeros((n,) + like.shape[1:], like.dtype)
                        for x, n in ((a, len(self.offsets)), (b, len(other.offsets))))
                like = mx.concatenate([a, b])
            arrays.append(like)
        if arrays:
            *self.recurrent, self.keys, self.values = arrays
        self.offsets = self.offsets + other.offsets

    def all_arrays(self):
        return [*self.recurrent, self.keys, self.values] if self.recurrent is not None else []

    def map_arrays(self, f):
        """(state, keys, values) with f applied to each array present."""
        if self.recurrent is None:
            return None, None, None
        return [None if x is None else f(x) for x in self.recurrent], f(self.keys), f(self.values)

    def prepare(self, lengths=None, right_padding=None, **kwargs):
        if kwargs.get("left_padding") is not None:
            raise ValueError("a linearized model's batch takes right padding (mlx-lm's BatchGenerator), not left padding")
        self.lengths = list(lengths) if right_padding is not None and max(right_padding) > 0 else None

    def finalize(self):
        self.lengths = None

    def take(self, length):
        """How many of a call's `length` tokens are each row's (the rest right padding)."""
        if self.lengths is None:
            return [length] * len(self.offsets)
        valid = [max(0, min(length, n)) for n in self.lengths]
        self.lengths = [n - length for n in self.lengths]
        return valid

    def rows_of(self, rows):
        """The compiled step's arrays (state, keys, values) for `rows` (None: every row)."""
        if rows is None:
            return self.recurrent, self.keys, self.values
        index = mx.array(rows)
        return self.map_arrays(lambda x: x[index])

    def put_rows(self, rows, state, keys, values):
        """Store a decode step's new arrays for `rows` (None: every row), one token further on."""
        if rows is None:
            self.recurrent, self.keys, self.values = list(state), keys, values
        else:
            index = mx.array(rows)
            for old, new in zip(self.all_arrays(), [*state, keys, values]):
                old[index] = new
        for row in rows if rows is not None else range(len(self.offsets)):
            self.offsets[row] += 1

    def positions(self, rows=None):
        """Each row's position and ring slot, (B, 1, 1, 1) int32 arrays the decode step takes."""
        rows = range(len(self.offsets)) if rows is None else rows
        offsets = [self.offsets[row] for row in rows]
        slots = [ring_slot(o, self.keep, self.window) for o in offsets]
        return mx.array(offsets).reshape(-1, 1, 1, 1), mx.array(slots).reshape(-1, 1, 1, 1)

    def start_steps(self, method, rows=None):
        """The rows whose step is of a kind that changes their state first (LoLA's block
        boundary, taken inside the one-sequence step) changed, as `method.start_step` does."""
        rows = range(len(self.offsets)) if rows is None else rows
        starting = [row for row in rows if method.step_kind(self.offsets[row])]
        if not starting:
            return
        index = mx.array(starting)
        started = method.start_step([x[index] for x in self.recurrent], mx.array([self.offsets[r] for r in starting]).reshape(-1, 1, 1))
        for old, new in zip(self.recurrent, started):
            old[index] = new

    @property
    def state(self):  # what mlx-lm evaluates
        return [x for x in self.all_arrays() if x is not None]

    @property
    def nbytes(self):
        return sum(x.nbytes for x in self.state)

    def empty(self):
        return not any(self.offsets)

    def size(self):
        return min(max(self.offsets, default=0), self.max_size)

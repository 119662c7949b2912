"""Liger Attention: a linearized branch mixed with a sliding-window softmax branch.

The module takes over the pretrained projections (and Qwen3 q/k norms, RoPE) of an mlx-lm
attention block under the same weight names, so checkpoints load unchanged.
"""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.models.base import scaled_dot_product_attention
from .batch import BatchLinearCache
from .decode import StepCache
from .rotary import RotaryTables, Rotation
from .window import attention_step, sliding_window_attention

PRETRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def keep_last(cache):
    """Drop what a multi-token RotatingKVCache update holds beyond its sinks and window.

    mlx-lm keeps max_size + L - 1 keys after a prefill of L (in temporal order); decoding
    needs only the `keep` sinks and the most recent max_size - keep.
    """
    size, keep = cache.max_size, cache.keep
    if cache.keys is not None and cache.keys.shape[2] > size:
        trim = lambda x: mx.contiguous(mx.concatenate([x[..., :keep, :], x[..., keep - size :, :]], axis=2))  # noqa: E731
        cache.keys, cache.values = trim(cache.keys), trim(cache.values)
        cache._idx = size


class Rope:
    """The layer's RoPE for one call: its tokens from the call's first position (`offset`), or from
    another (`at`); `fixed` puts every token at one position. `tables` (rotary.RotaryTables, or
    None) serve the positions they hold; in the compiled decode step, `rotation` is the step's own.
    A batch's decode step has one position a row: (B, 1, 1, 1) arrays."""

    def __init__(self, rope, offset, tables=None, rotation=None):
        self.rope, self.offset, self.tables, self.rotation = rope, offset, tables, rotation

    def __call__(self, x, at=None):
        if at is None:
            return self.rope(x, offset=per_row(self.offset)) if self.rotation is None else self.rotation.rotate(x)
        rows = self.table_rows(at, x.shape[-2])
        return self.rope(x, offset=at) if rows is None else rows.rotate(x)

    def table_rows(self, at, length):
        """The tables' rotation of `length` tokens from `at` (a decode step's 0-d array: one
        token), or None where they do not hold it."""
        if self.tables is None:
            return None
        if isinstance(at, mx.array):
            return self.tables.fixed[at]
        return self.tables.fixed[at : at + length] if at + length <= self.tables.size else None

    def fixed(self, x, at):
        if self.tables is not None:
            return self.tables.row(at).rotate(x)
        return self.rope(x[..., None, :], offset=at)[..., 0, :]

    def along(self, x, positions):
        """x (..., P, d), its row p rotated at positions[p] (P ints, numpy)."""
        if self.tables is not None:
            return self.tables.along(positions).rotate(x)
        moved = mx.moveaxis(x, -2, 0)  # RoPE takes one offset per batch row
        rotated = self.rope(moved.reshape(moved.shape[0], -1, 1, x.shape[-1]), offset=mx.array(positions))
        return mx.moveaxis(rotated.reshape(moved.shape), 0, -2)

    def rows(self, x, positions):
        """One token's x (..., 1, d) at each of `positions` (None: the offset; a Rotation; else fixed,
        an int or a decode step's array): (..., 1, P, d), in one elementwise op where the tables serve."""
        if self.tables is None or (self.rotation is None and None in positions):
            return mx.stack([self(x) if p is None else p.rotate(x) if isinstance(p, Rotation) else self.fixed(x, per_row(p))
                             for p in positions], axis=-2)
        rows = [self.rotation if p is None else p if isinstance(p, Rotation) else
                self.tables.fixed[p.reshape(-1, 1, 1) if is_per_row(p) else p] for p in positions]
        multipliers = [r.multipliers for r in rows]
        if len({m.shape for m in multipliers}) > 1:  # a batch's rows at their own positions
            multipliers = mx.broadcast_arrays(*multipliers)
        return Rotation(mx.stack(multipliers, axis=-3), self.tables.traditional).rotate(x[..., None, :])


def is_per_row(position):
    return isinstance(position, mx.array) and position.ndim > 0


def per_row(position):
    """A position as RoPE takes it: an int, a 0-d array, or one a row (B,)."""
    return position.reshape(-1) if is_per_row(position) else position


class LinearizedAttention(nn.Module):
    def __init__(self, attention: nn.Module, method: type, options: dict, window: int, sinks: int = 0, sink_horizon: int = 0):
        super().__init__()
        for name in PRETRAINED:
            if hasattr(attention, name):
                setattr(self, name, getattr(attention, name))
        self.rope = attention.rope
        self.n_heads = attention.n_heads
        self.n_kv_heads = attention.n_kv_heads
        self.scale = attention.scale
        self.window = window
        self.sinks = sinks
        self.sink_horizon = sink_horizon  # 0: StreamingLLM's, just before the window (sink_row)
        head_dim = self.q_proj.weight.shape[0] // self.n_heads
        self.method = method(self, **options)  # it reads the geometry above: heads, dims, window
        # The fixed positions read: the sinks' horizon, and the method's (LoLA's block and cache rows).
        self.rotary = RotaryTables.of(self.rope, head_dim, max(2 * window + sinks + 1, self.method.fixed_rows))
        # The pretrained forward, run on these same weights when softmax attention is wanted.
        self.softmax_forward = type(attention).__call__
        self.use_softmax = False
        self.recorder = None  # a callable given (input, output) of each softmax forward
        self.use_state = True  # False: the window branch alone (what the recurrent state adds)

    def project(self, x):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return (t.transpose(0, 2, 1, 3) for t in (q, k, v))

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None):
        if self.use_softmax:
            out = self.softmax_forward(self, x, mask=mask, cache=cache)
            if self.recorder is not None:  # the teacher's attention, for attention transfer
                self.recorder((x, out))
            return out
        if isinstance(cache, StepCache):
            return self.decode_step(x, cache)
        if isinstance(cache, BatchLinearCache):
            return self.batched(x, cache)
        q, k, v = self.project(x)
        state_cache, window_cache = cache if cache is not None else (None, None)
        offset = window_cache.offset if cache is not None else 0
        rope = Rope(self.rope, offset, self.rotary)
        linear = None
        if self.use_state and cache is None:
            linear, _ = self.method(q, k, v, rope)
        elif self.use_state:
            linear, state_cache.cache = self.method(q, k, v, rope, state_cache.cache)
        rotated = rope(q)
        sink_q, q, k = self.sink_queries(q, rotated, offset, rope), rotated, rope(k)
        if window_cache is not None:
            k, v = window_cache.update_and_fetch(k, v)
            keep_last(window_cache)
        window, mass = self.window_attention(q, k, v, offset, sink_q)
        return self.output(x, linear, window, mass)

    def batched(self, x, cache):
        """mlx-lm's batched generation (batch.BatchLinearCache): the rows whose window is full
        take a decode step together; the others (prompts, windows still filling) one by one,
        through the one-sequence path, so that each row is exactly its own sequence."""
        B, L, _ = x.shape
        tokens = cache.take(L)  # each row's tokens of the L (right padding after them)
        together = [row for row in range(B) if L == 1 and tokens[row] and cache.steady(row)]
        if len(together) == B:
            return self.step_rows(x, cache, None)
        out = mx.zeros_like(x)
        if together:
            index = mx.array(together)
            out[index] = self.step_rows(x[index], cache, together)
        for row in (row for row in range(B) if tokens[row] and row not in together):
            single = cache.extract(row)
            out[row : row + 1, : tokens[row]] = self(x[row : row + 1, : tokens[row]], cache=single)
            cache.set_row(row, single)
        return out

    def step_rows(self, x, cache, rows):
        """The decode step of a batch's `rows` (None: all), each at its own position."""
        cache.start_steps(self.method, rows)
        offset, slot = cache.positions(rows)
        rotation = self.rotary.at(offset) if self.rotary is not None else None
        step = StepCache(*cache.rows_of(rows), offset, slot, rotation, sink_rotation=self.sink_rotation(offset, rotation))
        out = self.decode_step(x, step)
        cache.put_rows(rows, step.state, step.keys, step.values)
        return out

    def output(self, x, linear, window, mass):
        """The mixed branches through the output projection."""
        return self.project_out(x, window if linear is None else self.method.mix(linear, window, mass))

    def project_out(self, x, out):
        """The heads' output (B, H, L, d) through the output projection."""
        B, L, _ = x.shape
        return self.o_proj(out.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, L, -1))

    def decode_step(self, x, cache):
        """One token once the window cache is full (decode.py compiles it): __call__'s decode
        path on a StepCache, whose position and ring-buffer slot are arrays."""
        q, k, v = self.project(x)
        rope = Rope(self.rope, cache.offset, self.rotary, cache.rotation)
        out, cache.state = self.method.step(self, q, k, v, rope, cache)
        return self.project_out(x, out)

    @property
    def sink_row(self):
        """The fixed position past which every query reads the sinks: `sink_horizon`, or by default
        StreamingLLM's, as if they lay just before its window. Before it, their true distance."""
        return self.sink_horizon or self.window + self.sinks - 1

    def sink_rotation(self, offset, rotation):
        """A decode step's rotation of its sink query, at min(offset, sink_row): the row's (a
        constant) where every step lies past it (decoding starts with the ring full), else the
        step's own `rotation` before it, chosen once a step for every layer. Without sinks, the
        step's own (what the fused kernels take for their unused sink row)."""
        if not self.sinks or self.rotary is None:
            return rotation
        row = self.rotary.row(self.sink_row)
        if self.sink_row < self.window + self.sinks:
            return row
        before = (offset <= self.sink_row).reshape(rotation.multipliers.shape[:-2] + (1, 1))
        return Rotation(mx.where(before, rotation.multipliers, row.multipliers), rotation.traditional)

    def step_positions(self, cache):
        """Where a decode step rotates its query: its own position, and the sinks' (the step's
        sink rotation, or where no tables serve its position)."""
        if not self.sinks:
            return [None]
        return [None, cache.sink_rotation if cache.sink_rotation is not None else mx.minimum(cache.offset, self.sink_row)]

    def sink_queries(self, q, rotated, offset, rope):
        """Queries for the sink scores: past `sink_row` every query sees the sinks at that fixed
        distance, so no query is ever further from them than at that position."""
        horizon, L = self.sink_row, q.shape[2]
        if not self.sinks or offset + L - 1 <= horizon:
            return None
        fixed = rope.fixed(q, horizon)
        if offset >= horizon:
            return fixed
        return mx.where((offset + mx.arange(L) > horizon)[:, None], fixed, rotated)

    def window_attention(self, q, k, v, offset, sink_q=None):
        """(output, mass or None). k, v: the cache's keys (sinks first, in temporal order)
        followed by the L current ones."""
        L, S = q.shape[2], self.sinks
        with_mass = self.method.needs_window_mass
        if L == 1 and (with_mass or sink_q is not None):
            queries = q[..., None, :] if sink_q is None else mx.stack([q, sink_q], axis=-2)
            return attention_step(queries, k, v, self.scale, S if sink_q is not None else 0, with_mass)
        if L == 1:  # decoding: the ring buffer holds exactly the sinks and the window
            return scaled_dot_product_attention(q, k, v, cache=None, scale=self.scale, mask=None), None
        sinks = (k[..., :S, :], v[..., :S, :]) if S else None
        recent = min(k.shape[2], self.window - 1 + L)  # the sinks are attended separately
        k, v = k[..., -recent:, :], v[..., -recent:, :]
        out = sliding_window_attention(q, k, v, self.window, self.scale, sinks, offset, sink_q, with_mass=True)
        return out if with_mass else (out[0], None)

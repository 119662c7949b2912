"""A layer's RoPE as per-position multipliers: rotate(x) = x * A + swap(x) * B, elementwise.

RoPE turns each pair of a head's dims by an angle that depends on the position alone, so a
rotation at a fixed position is two constant vectors, and a rotation at the decode step's
position is two vectors computed once a step for every layer. Both are read off the layer's
own RoPE module (any of mlx-lm's: scaled, Llama-3, YaRN) by rotating a probe, so they agree with
it. Applied as elementwise ops on views, a rotation fuses with its neighbours in a compiled
step, where a RoPE call rebuilds its angles (and, on the CPU, runs a dozen ops) each time.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

# The modules whose rotation depends on the position alone, not on the length of the call.
TABULATED = (nn.RoPE, Llama3RoPE, YarnRoPE)


def pairs(x, traditional):
    """x (..., d) viewed as (..., 2, d/2) (halves: RoPE's default) or (..., d/2, 2) (traditional):
    the two members of each rotated pair lie along one axis of size 2."""
    h = x.shape[-1] // 2
    return x.reshape(*x.shape[:-1], h, 2) if traditional else x.reshape(*x.shape[:-1], 2, h)


def swapped(x, traditional):
    """The pairs' members exchanged (a view)."""
    return x[..., ::-1] if traditional else x[..., ::-1, :]


class Rotation:
    """Multipliers (..., 2, d) [A, B] for a set of positions; `rotate` applies them."""

    def __init__(self, multipliers, traditional):
        self.multipliers, self.traditional = multipliers, traditional

    def __getitem__(self, index):
        if isinstance(index, int):  # a view: MLX indexes with an int by gathering
            index = slice(index, index + 1)
            return Rotation(self.multipliers[index].reshape(self.multipliers.shape[1:]), self.traditional)
        return Rotation(self.multipliers[index], self.traditional)

    def rotate(self, x):
        """x (..., d) rotated, in float32 then rounded to x's dtype (as MLX's RoPE kernels round)."""
        A, B = (pairs(m, self.traditional) for m in (self.multipliers[..., 0, :], self.multipliers[..., 1, :]))
        xp = pairs(x, self.traditional)
        out = xp * A + swapped(xp, self.traditional) * B  # x and the multipliers broadcast
        return out.reshape(*out.shape[:-2], -1).astype(x.dtype)


def probe(d, traditional):
    """The vector whose rotation is [cos, sin] of each pair: 1 on each pair's first member."""
    first = mx.array([1.0, 0.0])
    return mx.tile(first, d // 2) if traditional else mx.repeat(first, d // 2)


def multipliers(rotated_probe, traditional):
    """[A, B] from a rotated probe [cos, sin] (per pair, scaled as the module scales)."""
    cs = pairs(rotated_probe, traditional)
    cos, sin = (cs[..., 0, :], cs[..., 1, :]) if not traditional else (cs[..., 0], cs[..., 1])
    sign = mx.array([-1.0, 1.0])
    if traditional:
        A, B = mx.stack([cos, cos], axis=-1), mx.stack([sin, sin], axis=-1) * sign
    else:
        A, B = mx.stack([cos, cos], axis=-2), mx.stack([sin, sin], axis=-2) * sign[:, None]
    d = rotated_probe.shape[-1]
    return mx.stack([A.reshape(*A.shape[:-2], d), B.reshape(*B.shape[:-2], d)], axis=-2)


class RotaryTables:
    """The rotations of one RoPE module: at fixed positions 0..size-1 (computed once, here) and
    at an array position (`at`, once a decode step). None where the module does not rotate
    every dim of the head (partial rotary): the module itself is called then."""

    @classmethod
    def of(cls, rope, head_dim, size):
        if type(rope) not in TABULATED or rope.dims != head_dim:
            return None
        return cls(rope, head_dim, size)

    def __init__(self, rope, head_dim, size):
        self.rope, self.traditional, self.size = rope, rope.traditional, size
        self.probe = probe(head_dim, self.traditional)[None, None, None]
        # Each probe in its own batch row at its own position, as one token is rotated there.
        rotated = self.rope(mx.broadcast_to(self.probe, (size, 1, 1, head_dim)), offset=mx.arange(size))
        self.fixed = Rotation(multipliers(rotated[:, 0, 0], self.traditional), self.traditional)
        mx.eval(self.fixed.multipliers, self.probe)
        self.gathered, self.beyond = {}, {}

    def row(self, position):
        """The rotation at one fixed position (an int): the table's row, or beyond the table one
        computed once (a sink horizon far past the window)."""
        if position < self.size:
            return self.fixed[position]
        if position not in self.beyond:
            self.beyond[position] = self.at(position)
            mx.eval(self.beyond[position].multipliers)
        return self.beyond[position]

    def along(self, positions):
        """The rotation of rows at fixed `positions` (ints, numpy), gathered once: a constant of a
        compiled step, not a gather each token."""
        key = positions.tobytes()
        if key not in self.gathered:
            self.gathered[key] = self.fixed[mx.array(positions)]
            mx.eval(self.gathered[key].multipliers)
        return self.gathered[key]

    def at(self, position):
        """The rotation at `position` (an int or a 0-d array), as the module rotates one token there;
        or at one position a sequence of a batch ((B, 1, 1, 1)): (B, 1, 1, 2, d) multipliers."""
        if isinstance(position, mx.array) and position.ndim:
            probes = mx.broadcast_to(self.probe, (position.size,) + self.probe.shape[1:])
            rotated = self.rope(probes, offset=position.reshape(-1))[:, 0, 0]
            return Rotation(multipliers(rotated, self.traditional)[:, None, None], self.traditional)
        rotated = self.rope(self.probe, offset=position)[0, 0, 0]
        return Rotation(multipliers(rotated, self.traditional), self.traditional)

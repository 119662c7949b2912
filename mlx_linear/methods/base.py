"""The contract every linearization method fulfils.

A method turns the pretrained per-head q, k, v into the inputs of a gated linear scan
(feature maps and log-gates), runs the scan, reads its output out, and mixes it with the
sliding-window softmax branch. Its options are keyword arguments of its constructor (stored
in the converted config) and its trainable parameters, if any, are attributes of the module.
Scans, caches, conversion and the CLI only talk to this interface, so a new method is one
new module.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ..scan import gla_scan
from ..window import attention_step


class LinearMethod(nn.Module):
    name: str = ""
    linear_weight: float = 0.5  # the linear branch's share of the output (Liger's equal mix)
    state_size: int = 1  # arrays in the method's decode state (the scan's state first)
    needs_window_mass = False  # mix() gets the window's sum(exp(score - max)) and max per query
    fixed_rows = 0  # the RoPE rows at fixed positions the method reads (0 .. fixed_rows - 1)

    def __init__(self, attention: nn.Module):
        super().__init__()

    @staticmethod
    def check_options(*checks):
        """(holds, problem) pairs: the first that does not hold is the one-line error."""
        for holds, problem in checks:
            if not holds:
                raise ValueError(problem)

    def step_kind(self, offset):
        """The kind of compiled decode step (decode.py) the token at `offset` takes: steps whose
        Python control flow differs (LoLA's block boundaries) are compiled apart."""
        return None

    def start_step(self, state, offset):
        """The state a step of a kind that changes it first (step_kind) starts from; `offset`:
        its positions (B, 1, 1). A batch takes it apart for its rows at such a step."""
        return state

    def step(self, attention, q, k, v, rope, cache):
        """One token of the compiled decode step: (the mixed output, the new state); it writes
        the token's key and value into `cache` (decode.StepCache), the window's ring buffer."""
        cache.write(rope(k), v)
        linear, state = self(q, k, v, rope, cache.state)
        queries = rope.rows(q, attention.step_positions(cache))
        window, mass = attention_step(queries, cache.keys, cache.values, attention.scale, attention.sinks, self.needs_window_mass)
        return self.mix(linear, window, mass), state

    def features(self, q, k, v, rope):
        """(q, k, v, log_gate) for the scan; `rope(x)` applies the layer's RoPE at its offset."""
        raise NotImplementedError

    def scan(self, q, k, v, log_gate, state=None):
        """(output, *state): the recurrent step for decode, the chunked form for prefill and
        training (see scan.py). It takes the `state_size` arrays of the decode state."""
        return gla_scan(q, k, v, log_gate, state)

    def readout(self, output):
        return output

    def set_mix(self, attention, mix, learned_mix=False):
        """The linear branch's weight, `mix`; with `learned_mix`, one trainable weight per query
        head, sigmoid(w), starting at `mix` (training can weigh the branch down)."""
        if not 0 < mix < 1:
            raise ValueError(f"mix={mix}: the linear branch's weight must lie strictly between 0 and 1")
        self.linear_weight = mix
        if learned_mix:
            self.mix_logit = mx.full((attention.n_heads, 1, 1), math.log(mix / (1 - mix)))

    def mix_weight(self):
        return mx.sigmoid(self.mix_logit) if "mix_logit" in self else self.linear_weight

    def mix(self, linear, window, window_mass=None):
        weight = self.mix_weight()
        if not isinstance(weight, mx.array) and weight == 1:
            return linear  # a linear branch alone: the (lazy) window branch is never computed
        return weight * linear + (1 - weight) * window

    def __call__(self, q, k, v, rope, state=None):
        """(output, state): `state` is a list of `state_size` arrays (or Nones) for decode."""
        q, k, v, log_gate = self.features(q, k, v, rope)
        output, *state = self.scan(q, k, v, log_gate, *(state or [None] * self.state_size))
        return self.readout(output), state

"""The contract every linearization method fulfils.

A method turns the pretrained per-head q, k, v into the inputs of a gated linear scan
(feature maps and log-gates), runs the scan, and mixes its output with the sliding-window
softmax branch. Its trainable parameters, if any, are attributes of the module. Scans, caches,
conversion and the CLI only talk to this interface, so a new method is one new module.
"""

import mlx.nn as nn

from ..scan import gla_scan


class LinearMethod(nn.Module):
    name: str = ""

    def __init__(self, attention: nn.Module, **options):
        super().__init__()
        if options:
            raise ValueError(f"method {self.name} takes no options {sorted(options)}")

    def features(self, q, k, v, rope):
        """(q, k, v, log_gate) for the scan; `rope(x)` applies the layer's RoPE at its offset."""
        raise NotImplementedError

    def scan(self, q, k, v, log_gate, state):
        """Recurrent step for decode, chunked form for prefill and training (see scan.py)."""
        return gla_scan(q, k, v, log_gate, state)

    def mix(self, linear, window):
        return 0.5 * linear + 0.5 * window

    def __call__(self, q, k, v, rope, state=None):
        return self.scan(*self.features(q, k, v, rope), state)


"""Liger-GLA (arXiv 2503.01496): gates from the pretrained key projection, no new parameters.

log a_t = log_sigmoid(k_t) / 16 per key dim (raw key: before RoPE and the feature map, after a
Qwen3 k_norm), phi = softmax over the head dim, scale 1, no denominator. The state lives per KV
head: k and the gate come from the KV head, so every query head of a GQA group reads one state.

Options (the defaults are the paper's method):
- normalize: divide the linear branch by phi(q) . z, z the decayed sum of phi(k) (a column of
  ones appended to v carries z through the same scan);
- mix: the linear branch's weight, mix * linear + (1 - mix) * window (0.5);
- learned_mix: one trainable weight per query head, sigmoid(w), starting at `mix`;
- gate_normalizer: the divisor of the log-gate (16, GLA's); larger keeps more of the past: the
  median half-life of SmolLM2's gates is ~15 tokens at 16, inside the 64-token window;
- feature_proj: trainable per-head d x d maps before the feature maps of the linear branch,
  phi(q W_q), phi(k W_k), starting at the identity (as LoLCATs' learned feature maps, they
  let the linear branch adapt without moving the window branch's q and k).
"""

import mlx.core as mx

from .. import step_kernels
from ..fastmath import log_sigmoid, softmax
from . import register
from .base import LinearMethod

GATE_NORMALIZER = 16.0
EPS = 1e-6


@register
class LigerGLA(LinearMethod):
    name = "liger-gla"

    def __init__(self, attention, normalize=False, mix=0.5, learned_mix=False, feature_proj=False,
                 gate_normalizer=GATE_NORMALIZER):
        super().__init__(attention)
        if gate_normalizer <= 0:
            raise ValueError(f"gate_normalizer={gate_normalizer}: must be positive")
        self.normalize, self.gate_normalizer = normalize, gate_normalizer
        self.set_mix(attention, mix, learned_mix)
        if feature_proj:
            d = attention.q_proj.weight.shape[0] // attention.n_heads
            self.q_map = mx.broadcast_to(mx.eye(d), (attention.n_heads, d, d))
            self.k_map = mx.broadcast_to(mx.eye(d), (attention.n_kv_heads, d, d))

    def features(self, q, k, v, rope):
        q, k = q.astype(mx.float32), k.astype(mx.float32)
        log_gate = log_sigmoid(k) / self.gate_normalizer  # from the raw key, whatever the maps
        if "q_map" in self:
            q, k = q @ self.q_map, k @ self.k_map
        if self.normalize:
            v = mx.concatenate([v.astype(mx.float32), mx.ones(v.shape[:-1] + (1,))], axis=-1)
        return softmax(q), softmax(k), v, log_gate

    def step(self, attention, q, k, v, rope, cache):
        fused = step_kernels.liger_step(self, attention, q, k, v, rope, cache, EPS)  # one launch where a GPU kernel serves
        return fused or super().step(attention, q, k, v, rope, cache)

    def readout(self, output):
        if not self.normalize:
            return output
        return output[..., :-1] / (output[..., -1:] + EPS)

"""Liger-GLA (arXiv 2503.01496): gates from the pretrained key projection, no new parameters.

log a_t = log_sigmoid(k_t) / 16 per key dim (raw key: before RoPE and the feature map, after a
Qwen3 k_norm), phi = softmax over the head dim, scale 1, no denominator. The state lives per KV
head: k and the gate come from the KV head, so every query head of a GQA group reads one state.
"""

import mlx.core as mx
import mlx.nn as nn

from . import register
from .base import LinearMethod

GATE_NORMALIZER = 16.0


@register
class LigerGLA(LinearMethod):
    name = "liger-gla"

    def features(self, q, k, v, rope):
        q, k = q.astype(mx.float32), k.astype(mx.float32)
        log_gate = nn.log_sigmoid(k) / GATE_NORMALIZER
        return mx.softmax(q, axis=-1), mx.softmax(k, axis=-1), v, log_gate

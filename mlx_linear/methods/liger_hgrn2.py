"""Liger-HGRN2 (arXiv 2503.01496; OpenSparseLLMs/Linearization, liger_hgrn2): HGRN2's gates from
the pretrained key projection, no new parameters.

    a_t = sigmoid(k_t),  S_t = diag(a_t) S_{t-1} + (1 - a_t)^T v_t,  o_t = softmax(q_t) S_t

per key dim, from the raw key (before RoPE, after a Qwen3 k_norm): HGRN2 ties its input gate to
its forget gate, so the key is 1 - sigmoid(k) and is not feature-mapped. Scale 1, no denominator,
then liger-gla's 0.5 / 0.5 mix with the window. The log-gate is log_sigmoid(k) itself: unlike
Liger-GLA's, the code does not divide it by 16. The paper's table pools the key; in the released
code that pooling is an identity (AdaptiveAvgPool1d to the key's own width) and the layer's lower
bound on the gate is never set, so every layer uses the gate above. The state lives per KV head,
as liger-gla's: every query head of a GQA group reads one state.

Options mix and learned_mix: the linear branch's weight, fixed (0.5, the paper's) or learned per
query head from `mix`, as liger-gla's.
"""

import mlx.core as mx

from ..fastmath import log_sigmoid, softmax
from . import register
from .base import LinearMethod


@register
class LigerHGRN2(LinearMethod):
    name = "liger-hgrn2"

    def __init__(self, attention, mix=0.5, learned_mix=False):
        super().__init__(attention)
        self.set_mix(attention, mix, learned_mix)

    def features(self, q, k, v, rope):
        q, k = q.astype(mx.float32), k.astype(mx.float32)
        return softmax(q), mx.sigmoid(-k), v, log_sigmoid(k)  # sigmoid(-k) = 1 - sigmoid(k)

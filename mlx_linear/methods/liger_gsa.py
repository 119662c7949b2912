"""Liger-GSA (arXiv 2503.01496; OpenSparseLLMs/Linearization, liger_gsa): gated slot attention
whose slot gates are pooled from the pretrained key projection, no new parameters.

    f_t = pool(k_t) (M slots per KV head),  log a_t = log_sigmoid(f_t) / 16,  s_t = 1 - a_t

then fla's GSA (scan.gsa_scan) with scale 1 on the raw q and k (no feature map, before RoPE):
the keys write s into a d x M memory, the queries' scores over the slots go through a softmax,
and that reads from an M x d memory the values s wrote, both memories decayed by a_t. Mixed
0.5 / 0.5 with the window, as liger-gla. pool is PyTorch's AdaptiveAvgPool1d over the KV heads'
raw keys side by side (after a Qwen3 k_norm), as in the code. The state is the two memories per
KV head: every query head of a GQA group reads them.

Options:
- slots (M): 0, the default, is the head dim, as in the released checkpoint's config (pool_size
  128 for Llama-3-8B's 128-dim heads), so the pooling is an identity, as liger-gla's; the code's
  config class defaults to 64, which is SmolLM2's head dim;
- mix, learned_mix: the linear branch's weight, fixed (0.5, the paper's) or learned per query
  head from `mix`, as liger-gla's.
"""

import mlx.core as mx

from . import register
from ..fastmath import log_sigmoid
from ..scan import gsa_scan
from .base import LinearMethod
from .liger_gla import GATE_NORMALIZER


def adaptive_pool_matrix(n_in, n_out):
    """(n_in, n_out) averages of AdaptiveAvgPool1d: bin i is [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    bins = mx.arange(n_out)
    start, end = bins * n_in // n_out, -(-(bins + 1) * n_in // n_out)
    inputs = mx.arange(n_in)[:, None]
    return ((inputs >= start) & (inputs < end)) / (end - start)


@register
class LigerGSA(LinearMethod):
    name = "liger-gsa"
    state_size = 2  # the keys' d x M memory, then the values' M x d memory

    def __init__(self, attention, slots=0, mix=0.5, learned_mix=False):
        super().__init__(attention)
        self.set_mix(attention, mix, learned_mix)
        if not isinstance(slots, int) or slots < 0:
            raise ValueError(f"slots={slots}: give a whole number of slots per head, or 0 for the head dim")
        Hkv, d = attention.n_kv_heads, attention.q_proj.weight.shape[0] // attention.n_heads
        self._pool = adaptive_pool_matrix(Hkv * d, Hkv * (slots or d))  # fixed: neither trained nor saved

    def features(self, q, k, v, rope):
        B, Hkv, L, d = k.shape
        k = k.astype(mx.float32)
        pooled = k.transpose(0, 2, 1, 3).reshape(B, L, Hkv * d) @ self._pool
        pooled = pooled.reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        return q.astype(mx.float32), k, v, log_sigmoid(pooled) / GATE_NORMALIZER

    def scan(self, q, k, v, log_gate, key_state=None, value_state=None):
        slots = -mx.expm1(log_gate)  # s = 1 - a: what each slot takes of the token
        return gsa_scan(q, k, v, slots, log_gate, key_state, value_state)

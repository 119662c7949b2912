"""SUPRA (arXiv 2405.06640, TRI-ML/linear_open_lm): a learned ReLU feature map, a fixed decay
per head and a per-head GroupNorm in place of the linear-attention denominator.

phi(x) = relu(W x + b), one dense layer over all query heads together (keys get their own when
the model uses GQA, else they share the queries'); RoPE after phi; keys scaled by 1/sqrt(d).
S_t = gamma_h S_{t-1} + phi(k_t)^T v_t, o_t = phi(q_t) S_t, gamma_h = exp(-2^(-(h+1) * 8 / H)),
so the state lives per query head (keys and values repeated over each GQA group).

The feature maps are new parameters. SUPRA trains everything on billions of tokens from a
random start; here they start at the identity (phi(x) = relu(x), the pretrained geometry) and
train as method parameters next to the LoRA weights. Option `mix` < 1 adds the window branch.
"""

import mlx.core as mx
import mlx.nn as nn

from . import register
from .base import LinearMethod

GROUP_NORM_EPS = 1e-5


def identity_dense(dims):
    dense = nn.Linear(dims, dims)
    dense.weight, dense.bias = mx.eye(dims), mx.zeros((dims,))
    return dense


def head_decays(n_heads):
    """log gamma_h = -2^(-(h+1) * 8 / H), shaped (H, 1, 1) to broadcast over (L, 1)."""
    h = mx.arange(1, n_heads + 1, dtype=mx.float32)
    return -mx.power(2.0, -h * 8 / n_heads)[:, None, None]


def relu_features(dense, x):
    """relu(W x + b) over the heads of x (B, H, L, d) concatenated, as one H*d vector."""
    B, H, L, d = x.shape
    x = x.astype(mx.float32).transpose(0, 2, 1, 3).reshape(B, L, H * d)
    return nn.relu(dense(x)).reshape(B, L, H, d).transpose(0, 2, 1, 3)


@register
class SUPRA(LinearMethod):
    name = "supra"

    def __init__(self, attention, mix=1.0):
        super().__init__(attention)
        if not 0 < mix <= 1:
            raise ValueError(f"mix={mix}: the linear branch's weight must lie in (0, 1]")
        H, Hkv = attention.n_heads, attention.n_kv_heads
        d = attention.q_proj.weight.shape[0] // H
        self.linear_weight = mix
        self.q_feature = identity_dense(H * d)
        if Hkv != H:
            self.k_feature = identity_dense(Hkv * d)
        self._log_decay = head_decays(H)  # fixed: private, so neither trained nor saved

    def features(self, q, k, v, rope):
        B, H, L, d = q.shape
        groups = H // k.shape[1]
        q = rope(relu_features(self.q_feature, q))
        k = rope(relu_features(self.k_feature if "k_feature" in self else self.q_feature, k)) * d**-0.5
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v.astype(mx.float32), groups, axis=1)
        return q, k, v, mx.broadcast_to(self._log_decay, (B, H, L, 1))

    def readout(self, output):
        return mx.fast.layer_norm(output, None, None, GROUP_NORM_EPS)

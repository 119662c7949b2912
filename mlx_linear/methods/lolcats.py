"""LoLCATs (arXiv 2410.10254; HazyResearch/lolcats, linear_window_attention_sw): a 64-token
softmax window and a linear attention over everything before it, under one denominator.

    y_t = (g sum_win exp(q.k / sqrt(d) - m_t) v + phi(q_t) S) / (g sum_win exp(q.k / sqrt(d) - m_t) + phi(q_t) z)

m_t the window's largest score (the linear term is not scaled by exp(-m_t), as in the code), g = sigmoid(w_h)
per head, from 0.1; S, z sum phi(k_s) v_s and phi(k_s) over s <= t - W (keys enter as they leave the window).
phi(x) = [softmax(x W), softmax(-x W)] (Hedgehog), one W (d x f, the identity's first f columns) per query
head for q and for k, after RoPE. Options: feature_dim f (0: d/2; the paper: 64 for d = 128); half_life
(tokens; 0, the paper's: none): S, z decay by 2^(-1/half_life) a token; after_rope=false: maps before RoPE.
"""

import math

import mlx.core as mx

from ..fastmath import softmax
from . import register
from .base import LinearMethod


def hedgehog(x, weights):
    """[softmax(x W), softmax(-x W)] per head: x (B, H, L, d), weights (H, d, f); both halves
    normalised in one softmax over their (2, f) view."""
    y = x.astype(mx.float32) @ weights
    return softmax(mx.stack([y, -y], axis=-2)).reshape(*y.shape[:-1], -1)


@register
class LoLCATs(LinearMethod):
    name = "lolcats"
    state_size = 3  # S (z as its last column), the queue of keys and values in the window
    needs_window_mass = True

    def __init__(self, attention, window_factor=0.1, half_life=0.0, after_rope=True, feature_dim=0):
        super().__init__(attention)
        H, d = attention.n_heads, attention.q_proj.weight.shape[0] // attention.n_heads
        self.check_options((0 < window_factor < 1, f"window_factor={window_factor}: give a weight between 0 and 1, both excluded"),
                           (half_life >= 0, f"half_life={half_life}: give a number of tokens, or 0 for no decay"),
                           (feature_dim in range(d + 1), f"feature_dim={feature_dim}: give a whole number to {d} (0: {d // 2})"))
        self.log_decay, self.after_rope, self.window = -math.log(2) / half_life if half_life else 0.0, after_rope, attention.window
        f = int(feature_dim) or d // 2
        self.q_map = self.k_map = mx.broadcast_to(mx.eye(d)[:, :f], (H, d, f))
        self.window_logit = mx.full((H, 1, 1), math.log(window_factor / (1 - window_factor)))

    def feature_maps(self, q, k, v, rope):
        groups = q.shape[1] // k.shape[1]
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v.astype(mx.float32), groups, axis=1)
        v = mx.concatenate([v, mx.ones(v.shape[:-1] + (1,))], axis=-1)  # carries z through the scan
        q, k = (rope(q), rope(k)) if self.after_rope else (q, k)
        return hedgehog(q, self.q_map), hedgehog(k, self.k_map), v

    def __call__(self, q, k, v, rope, state=None):
        q, k, v = self.feature_maps(q, k, v, rope)
        B, H, L, _ = k.shape
        S, queued_k, queued_v = state if state and state[0] is not None else (
            None, mx.zeros((B, H, self.window, k.shape[-1])), mx.zeros((B, H, self.window, v.shape[-1])))
        keys, values = mx.concatenate([queued_k, k], axis=2), mx.concatenate([queued_v, v], axis=2)
        # Query t reads the state after key t - W, the first of `keys` for the first query.
        output, S = self.scan(q, keys[:, :, :L], values[:, :, :L], mx.full((B, H, L, 1), self.log_decay), S)
        return output, [S, keys[:, :, -self.window :], values[:, :, -self.window :]]

    def mix(self, linear, window, window_mass=None):
        if window_mass is None:
            raise ValueError("lolcats needs the window's softmax mass")
        weight = mx.sigmoid(self.window_logit) * window_mass[..., :1]
        return (weight * window + linear[..., :-1]) / (weight + linear[..., -1:])

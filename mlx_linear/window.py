"""Sliding-window softmax attention over the last `window` keys (the current one included)."""

import mlx.core as mx


def _block_mask(num_blocks, window, missing):
    """(num_blocks, W, 2W): query r of block b sees key c of its 2W keys iff r < c <= W + r.

    The first `missing` keys of the padded sequence do not exist (fewer than W earlier keys).
    """
    r = mx.arange(window)[:, None]
    c = mx.arange(2 * window)[None, :]
    in_window = (c > r) & (c <= window + r)
    position = mx.arange(num_blocks)[:, None, None] * window + c
    return in_window & (position >= missing)


def sliding_window_attention(q, k, v, window, scale):
    """q (B, H, L, d); k, v (B, Hkv, P + L, d): P <= window - 1 earlier keys, then the L current.

    Query i attends the `window` keys ending at its own. Blocked: each block of W queries reads
    2W keys, so time and memory are O(L * W) rather than O(L^2).
    """
    B, H, L, _ = q.shape
    Hkv, total, dv = k.shape[1], k.shape[2], v.shape[-1]
    if L == 1:
        return mx.fast.scaled_dot_product_attention(q, k[..., -window:, :], v[..., -window:, :], scale=scale)
    R = H // Hkv
    earlier = total - L
    num_blocks = -(-L // window)
    missing = window - earlier
    back = num_blocks * window - L
    widths = [(0, 0), (0, 0), (missing, back), (0, 0)]
    k, v = mx.pad(k, widths), mx.pad(v, widths)

    def pairs(x):
        blocks = x.reshape(B, Hkv, num_blocks + 1, window, x.shape[-1])
        return mx.concatenate([blocks[:, :, :-1], blocks[:, :, 1:]], axis=-2)[:, :, None]

    q = mx.pad(q, [(0, 0), (0, 0), (0, back), (0, 0)])
    q = q.reshape(B, Hkv, R, num_blocks, window, q.shape[-1])
    scores = (q * scale) @ pairs(k).swapaxes(-1, -2)
    scores = mx.where(_block_mask(num_blocks, window, missing), scores.astype(mx.float32), -mx.inf)
    weights = mx.softmax(scores, axis=-1).astype(v.dtype)
    out = weights @ pairs(v)
    return out.reshape(B, H, num_blocks * window, dv)[:, :, :L]

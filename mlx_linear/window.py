"""Sliding-window softmax attention over the last `window` keys (the current one included),
plus optional attention-sink keys: the sequence's first tokens, seen by every query
(StreamingLLM, arXiv 2309.17453)."""

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


def _sink_mask(num_blocks, window, num_sinks, first_position):
    """(num_blocks, W, S): sink u is seen by the query at position p once the window left it."""
    query = first_position + mx.arange(num_blocks * window).reshape(num_blocks, window, 1)
    return mx.arange(num_sinks) <= query - window


def sliding_window_attention(q, k, v, window, scale, sinks=None, first_position=0):
    """q (B, H, L, d); k, v (B, Hkv, P + L, d): P <= window - 1 earlier keys, then the L current.

    Query i attends the `window` keys ending at its own, and the sink keys `sinks = (k, v)`
    (positions 0..S-1) that lie before its window; `first_position` is query 0's position.
    Blocked: each block of W queries reads 2W (+ S) keys, so time and memory are O(L * W).
    """
    B, H, L, _ = q.shape
    Hkv, total, dv = k.shape[1], k.shape[2], v.shape[-1]
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
    q = q.reshape(B, Hkv, R, num_blocks, window, q.shape[-1]) * scale
    scores = q @ pairs(k).swapaxes(-1, -2)
    mask = _block_mask(num_blocks, window, missing)
    if sinks is not None:
        sink_k, sink_v = (x[:, :, None, None] for x in sinks)
        scores = mx.concatenate([q @ sink_k.swapaxes(-1, -2), scores], axis=-1)
        mask = mx.concatenate([_sink_mask(num_blocks, window, sink_k.shape[-2], first_position), mask], axis=-1)
    weights = mx.softmax(mx.where(mask, scores.astype(mx.float32), -mx.inf), axis=-1).astype(v.dtype)
    if sinks is None:
        out = weights @ pairs(v)
    else:
        S = sink_v.shape[-2]
        out = weights[..., :S] @ sink_v + weights[..., S:] @ pairs(v)
    return out.reshape(B, H, num_blocks * window, dv)[:, :, :L]

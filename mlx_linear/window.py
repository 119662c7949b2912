"""Sliding-window softmax attention over the last `window` keys (the current one included),
plus optional attention-sink keys: the sequence's first tokens, seen by every query
(StreamingLLM, arXiv 2309.17453).

Sink scores may use their own queries (`sink_q`): the attention module rotates them so that a
query never sits further from the sinks than just past the window (see attention.py)."""

import mlx.core as mx
import numpy as np

from .fastmath import exp


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


def masked_softmax(scores, mask):
    """(weights, mass): the softmax over the visible scores and, per query, sum(exp(score - max))
    and max: the window's share in a denominator shared with other terms (LoLCATs)."""
    scores = mx.where(mask, scores.astype(mx.float32), -mx.inf)
    top = scores.max(axis=-1, keepdims=True)
    exps = exp(scores - top)
    mass = exps.sum(axis=-1, keepdims=True)
    return exps / mass, mx.concatenate([mass, top], axis=-1)


def by_kv_head(x, product):
    """product(x) with x (B, Hkv, ...rows..., c) flattened to (B, Hkv, rows, c) and back: the
    queries of a KV head against its few keys (sinks) as one matrix product, with no batch axis
    broadcast (a GPU's batched-matmul path for those is where CUDA runs went wrong with sinks)."""
    out = product(x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def step_scores(queries, keys, scale, spans=()):
    """Scores of one token's query rows (B, H, 1, P, d), each a rotation of its query, against
    keys (B, Hkv, N, d): key n is scored by row 0, or by the row of the span (row, start, end)
    holding it. (B, Hkv, H / Hkv, 1, N); all rows in one matmul, the picks fused elementwise."""
    B, H, _, P, d = queries.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    scores = by_kv_head(queries.reshape(B, Hkv, H // Hkv, P, d) * scale, lambda x: x @ keys.swapaxes(-1, -2))
    picked = scores[..., :1, :]
    for row, start, end in spans:
        inside = mx.array((np.arange(N) >= start) & (np.arange(N) < end))  # a constant, not an op
        picked = mx.where(inside, scores[..., row : row + 1, :], picked)
    return picked.astype(mx.float32)


def attention_step(queries, k, v, scale, num_sinks=0, with_mass=False):
    """One token's query over every key of a decode cache (sinks first, then the window):
    queries (B, H, 1, P, d), row 1 (where P = 2) scoring the sinks. (output (B, H, 1, dv), and
    with `with_mass` the softmax's mass and max (B, H, 1, 2), else None)."""
    B, H = queries.shape[:2]
    if queries.shape[3] == 1 and not with_mass:  # one kernel on a GPU (MLX's attention for one query)
        return mx.fast.scaled_dot_product_attention(queries[..., 0, :], k, v, scale=scale), None
    scores = step_scores(queries, k, scale, [(1, 0, num_sinks)] if queries.shape[3] > 1 else [])
    if not with_mass:
        return by_kv_head(mx.softmax(scores, axis=-1).astype(v.dtype), lambda x: x @ v).reshape(B, H, 1, -1), None
    weights, mass = masked_softmax(scores, mx.array(True))  # every key of a full cache is visible
    out = by_kv_head(weights.astype(v.dtype), lambda x: x @ v)
    return out.reshape(B, H, 1, -1), mass.reshape(B, H, 1, 2)


def sliding_window_attention(q, k, v, window, scale, sinks=None, first_position=0, sink_q=None, with_mass=False):
    """q (B, H, L, d); k, v (B, Hkv, P + L, d): P <= window - 1 earlier keys, then the L current.

    Query i attends the `window` keys ending at its own, and the sink keys `sinks = (k, v)`
    (positions 0..S-1) that lie before its window; `first_position` is query 0's position.
    Blocked: each block of W queries reads 2W (+ S) keys, so time and memory are O(L * W).
    With `with_mass`, also returns sum(exp(score - max)) and max per query (B, H, L, 2).
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

    def blocked(x):
        x = mx.pad(x, [(0, 0), (0, 0), (0, back), (0, 0)])
        return x.reshape(B, Hkv, R, num_blocks, window, x.shape[-1]) * scale

    q_blocks = blocked(q)
    scores = q_blocks @ pairs(k).swapaxes(-1, -2)
    mask = _block_mask(num_blocks, window, missing)
    if sinks is not None:
        sink_k, sink_v = sinks
        S = sink_k.shape[-2]
        sink_queries = q_blocks if sink_q is None else blocked(sink_q)
        scores = mx.concatenate([by_kv_head(sink_queries, lambda x: x @ sink_k.swapaxes(-1, -2)), scores], axis=-1)
        mask = mx.concatenate([_sink_mask(num_blocks, window, S, first_position), mask], axis=-1)
    weights, mass = masked_softmax(scores, mask)
    weights = weights.astype(v.dtype)
    if sinks is None:
        out = weights @ pairs(v)
    else:
        out = by_kv_head(weights[..., :S], lambda x: x @ sink_v) + weights[..., S:] @ pairs(v)
    out = out.reshape(B, H, num_blocks * window, dv)[:, :, :L]
    return (out, mass.reshape(B, H, num_blocks * window, 2)[:, :, :L]) if with_mass else out

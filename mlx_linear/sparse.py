"""LoLA's sparse cache (arXiv 2505.23666) for LoLCATs: a fixed number of past keys and values
that the linear state would recall badly are kept exact, beside the window and the state.

Positions go in blocks of C = window tokens. A key that leaves the window stays exact
("pending") until its whole block has left; at the next block boundary it and the cache's keys
are ranked by their self-recall error against the state, || phi(k) S / phi(k) z - v ||^2 (summed
over the query heads of its KV head): the `slots` worst stay in the cache, the rest enter S and
z. So a query of block b sees exactly the sinks and its window (the window branch), the keys of
block b - 1 that left the window, and the cache chosen at b's boundary; everything else through
the state, decayed from when the key left the window. The cache is kept in the order of
positions, filled from its last slot back, and read as a compact past just beyond the pending
block, whatever its keys' ages (StreamingLLM's positions within the cache): with `span` (LoLA's
cache_span), slot j lies at position floor(j span / slots), the query reads it from 2C + span. So no
query is further from a key than 2C + span, and a needle's tokens keep their order among other
old keys (read all from one distance, as before, they drown in them).
Sinks go to the state, never to the cache. With `unique` (LoLA's cache_unique), a candidate whose
key and value cosines with a better-ranked one's both exceed it enters the state instead: a copy
adds little that its original does not, and repeated text would otherwise fill the cache with copies.

State per layer: S (z its last column); the last two blocks' raw keys, values and features;
the cache's raw keys, values, features and positions (-1: an empty slot).
"""

import mlx.core as mx
import numpy as np

from . import step_kernels
from .decode import write_at
from .fastmath import exp
from .window import by_kv_head, step_scores


def empty_state(B, H, Hkv, C, slots, d, F):
    zeros = mx.zeros
    return [zeros((B, H, F, d + 1)), zeros((B, Hkv, 2 * C, d)), zeros((B, Hkv, 2 * C, d)), zeros((B, H, 2 * C, F)),
            zeros((B, Hkv, slots, d)), zeros((B, Hkv, slots, d)), zeros((B, H, slots, F)), mx.full((B, Hkv, slots), -1.0)]


def with_ones(values):
    return mx.concatenate([values, mx.ones(values.shape[:-1] + (1,))], axis=-1)


def recall_error(features, values, S):
    """|| phi(k) S / phi(k) z - v ||^2 per entry, summed over each KV head's query heads (B, Hkv, N)."""
    B, Hkv, N, _ = values.shape
    recalled = features @ S
    num, den = recalled[..., :-1], recalled[..., -1:]
    guess = mx.where(den > 0, num / mx.where(den > 0, den, 1), 0)
    error = (guess - mx.repeat(values, features.shape[1] // Hkv, axis=1)).square().sum(-1)
    return error.reshape(B, Hkv, -1, N).sum(2)


def similar(x, C, threshold):
    """(B, Hkv, N, C): the pairs of a row of x (B, Hkv, N, d) and one of its last C rows whose cosine is above `threshold` (> 0)."""
    dots, norms = x @ x[..., -C:, :].swapaxes(-1, -2), (x * x).sum(-1)
    return (dots > 0) & (dots * dots > threshold**2 * norms[..., :, None] * norms[..., None, -C:])


def copies(keys, values, score, C, threshold):
    """Which candidates (the cache's, then the block's C) have a better-ranked copy: a candidate whose
    key and value cosines with theirs are both above `threshold`. Only pairs with a block key are
    compared (N x C, not N x N): the cache holds no copies of its own."""
    N = score.shape[-1]
    index, block_index, block_score = mx.arange(N), mx.arange(N - C, N), score[..., N - C :]
    pairs = similar(keys, C, threshold) & similar(values, C, threshold)
    # [i, b]: block key b ranks above candidate i (ties: the earlier); below it where i is in the cache
    block_better = (block_score[..., None, :] > score[..., :, None]) | (
        (block_score[..., None, :] == score[..., :, None]) & (block_index < index[:, None]))
    has_copy = (pairs & block_better).any(-1)  # a better copy in the block: any candidate
    in_cache_copy = (pairs & ~block_better & (index < N - C)[:, None]).any(-2)  # a better copy in the cache: a block key
    return has_copy | mx.pad(in_cache_copy, [(0, 0)] * (in_cache_copy.ndim - 1) + [(N - C, 0)])


def boundary(S, cache, block, start, sinks, log_decay, horizon=0, age_decay=0.0, unique=0.0, long_slots=0, sink_state=True):
    """The boundary of the block that starts at position `start`: the cache and the block two
    back (all of it out of the window now) are ranked, the `slots` worst recalled stay in the
    cache, the rest enter S, which is then the state of keys up to start - C, as of start - C.
    With a `horizon`, keys more than that many positions back leave the cache whatever their rank,
    but for the `long_slots` best ranked of them; with an `age_decay` (< 0, per token), a key's
    score is its error decayed by its age, so that only a key the state recalls far worse than the
    new ones stays long. With `unique` (a cosine), a key with a better-ranked copy enters the state.
    The sinks enter it only with `sink_state` (the window reads them exactly anyway)."""
    keys, values, features, positions = (mx.concatenate(pair, axis=2) for pair in zip(cache, block))
    slots, C, groups = cache[0].shape[2], block[0].shape[2], features.shape[1] // keys.shape[1]
    old = (positions < start - horizon) if horizon else mx.zeros(positions.shape, dtype=mx.bool_)
    eligible = (positions >= sinks) & (~old if not long_slots else True)
    error = mx.stop_gradient(recall_error(features, values, S))
    if age_decay:
        error = error * exp(age_decay * (start - positions))
    score = mx.where(eligible, error, -mx.inf)
    if unique:
        eligible = eligible & ~copies(mx.stop_gradient(keys), mx.stop_gradient(values), score, C, unique)
        score = mx.where(eligible, error, -mx.inf)
    if long_slots and horizon:  # past the horizon, only the best ranked few stay
        rank = mx.argsort(mx.argsort(-mx.where(old, score, -mx.inf), axis=-1), axis=-1)
        eligible = eligible & (~old | (rank < long_slots))
        score = mx.where(eligible, error, -mx.inf)
    order = mx.argsort(-score, axis=-1)  # stable: of equal scores (repeated tokens) the older stays
    top, N = order[..., :slots], score.shape[-1]
    # The empty slots first, then the cache in the order of positions (its last slots).
    keep = mx.sort(top + N * mx.take_along_axis(eligible, top, axis=-1), axis=-1) % N
    stays = mx.take_along_axis(eligible, keep, axis=-1)
    cached = (mx.argsort(order, axis=-1) < slots) & eligible
    unwritten = cached if sink_state else cached | (positions < sinks)
    weight = mx.where(unwritten, 0.0, exp(log_decay * (start - C - positions)))  # decayed since it left the window
    written = (features * mx.repeat(weight, groups, axis=1)[..., None]).swapaxes(-1, -2)
    S = exp(log_decay * C) * S + written @ mx.repeat(with_ones(values), groups, axis=1)
    picked = [mx.take_along_axis(x, mx.repeat(keep, x.shape[1] // keep.shape[1], axis=1)[..., None], axis=2)
              * mx.repeat(stays, x.shape[1] // keep.shape[1], axis=1)[..., None] for x in (keys, values, features)]
    return S, (*picked, mx.where(stays, mx.take_along_axis(positions, keep, axis=-1), -1.0))


# One function for every block of a run (its start an array, not a constant to trace anew): its
# elementwise ops fuse, a block's ~50 kernels become ~20, what a prefill step's loop over blocks pays.
compiled_boundary = mx.compile(boundary)


def blocks(x, C, front=0):
    """(B, H, L, ...) -> (B, H, n, C, ...): `front` zeros before, zeros after to whole blocks."""
    back = -(front + x.shape[2]) % C
    x = mx.pad(x, [(0, 0), (0, 0), (front, back)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(x.shape[0], x.shape[1], -1, C, *x.shape[3:])


def timeline(state, k, v, k_features, start, end, C):
    """Raw keys, values, features and positions (-1: none) from `start` (a block before the last
    one seen: what the state buffers) to `end`, the chunk's, in blocks of C."""
    B, Hkv, L, _ = k.shape
    if end - start <= 2 * C:  # within the buffer (decode): written in place
        line = [mx.slice_update(old, new, mx.array(end - L - start), axes=(2,)) for old, new in zip(state[1:4], (k, v, k_features))]
    else:
        line = [mx.concatenate([old[:, :, : end - L - start], new], axis=2) for old, new in zip(state[1:4], (k, v, k_features))]
    line = [blocks(x, C) for x in line]
    positions = mx.arange(start, start + line[0].shape[2] * C, dtype=mx.float32)
    positions = mx.where(positions < end, positions, -1).reshape(-1, C)
    return line + [mx.broadcast_to(positions, (B, Hkv) + positions.shape)]


def forward(method, q, k, v, q_features, k_features, rope, state=None):
    """A chunk of L tokens from position `rope.offset` through LoLA `method`: (per query, the
    state's numerator and denominator, then the exact keys' numerator, denominator and largest
    score; the new state). q (B, H, L, d), k, v (B, Hkv, L, d) unrotated; features (B, H, L, F)."""
    (B, H, L, d), C, o = q.shape, method.window, getattr(rope, "offset", 0)
    if not state or state[0] is None:
        state = empty_state(B, H, k.shape[1], C, method.slots, d, q_features.shape[-1])
    last_seen = (o - 1) // C  # the block of the last position before the chunk (-1: none)
    line = timeline(state, k, v.astype(mx.float32), k_features, (last_seen - 1) * C, o + L, C)
    S, kept, read = state[0], tuple(state[4:]), []
    for b in range(o // C, (o + L - 1) // C + 1):  # each query block reads the state and cache of its boundary
        if b * C >= o:  # that boundary lies in this chunk: block b - 2 has left the window
            block, start = [x[:, :, b - 1 - last_seen] for x in line], mx.array(b * C)
            fused = step_kernels.lola_boundary(boundary, S, kept, block, start, *method.cache_rule)
            S, kept = fused or compiled_boundary(S, kept, block, start, *method.cache_rule)
        read.append((S, *kept))
    S_read, kept_k, kept_v, _, kept_at = (mx.stack(x, axis=2) if len(read) > 1 else x[0][:, :, None] for x in zip(*read))
    front, pending = o % C, slice(o // C - last_seen, -1)  # pending: the block before each query block
    if len(read) == 1:  # within one block (decode): its L rows only
        rows, by_block = front + mx.arange(L), lambda x: x[:, :, None]  # noqa: E731
    else:
        rows, by_block = mx.arange(C), lambda x: blocks(x, C, front)  # noqa: E731
    terms = read_terms(method, rope, q, q_features, S_read, [x[:, :, pending] for x in (line[0], line[1], line[3])],
                       (kept_k, kept_v, kept_at), rows, by_block, o - (pending.start + last_seen - 1) * C)
    terms = terms.reshape(B, H, -1, terms.shape[-1])
    terms = terms if len(read) == 1 else terms[:, :, front : front + L]
    return terms, [S, *(x[:, :, -2:].reshape(B, x.shape[1], 2 * C, *x.shape[4:]) for x in line[:3]), *kept]


def shift_blocks(method, state, o):
    """A block boundary in the compiled step (o = the block's start, an array): the buffer's first
    block and the cache are ranked as `forward` ranks them, and the buffer moves one block on."""
    C, (B, Hkv) = method.window, state[1].shape[:2]
    positions = mx.broadcast_to(o - 2 * C + mx.array(np.arange(C, dtype=np.float32)), (B, Hkv, C))
    block = [x[:, :, :C] for x in state[1:4]] + [positions]
    S, kept = boundary(state[0], tuple(state[4:]), block, o, *method.cache_rule)
    shifted = [mx.pad(x[:, :, C:], [(0, 0), (0, 0), (0, C)] + [(0, 0)] * (x.ndim - 3)) for x in state[1:4]]
    return [S, *shifted, *kept]


def step(method, attention, q, k, v, rope, cache):
    """One token of the compiled decode step, its position an array, with the window branch: the
    state's terms, then one softmax over the window's keys (sinks first), the pending block's and
    the cache's, each scored by its own rotation of the query, under LoLCATs' shared denominator
    (`combine`'s, folded). The buffer's first block is the pending one; the token goes to C + r."""
    state = method.start_step(cache.state, rope.offset) if cache.kind else cache.state  # a block's first token
    fused = step_kernels.lola_step(method, attention, q, k, v, rope, state, cache)  # one launch where a GPU kernel serves
    return fused if fused is not None else step_ops(method, attention, q, k, v, rope, cache, state)


def step_ops(method, attention, q, k, v, rope, cache, state):
    """`step` in MLX ops, the fused kernel's oracle."""
    C, o = method.window, rope.offset
    r = o % C
    cache.write(rope(k), v)
    q_features, k_features, _ = method.feature_maps(q, k, v, rope)
    buffered = [write_at(old, new, C + r) for old, new in zip(state[1:4], (k, v.astype(mx.float32), k_features))]
    positions = attention.step_positions(cache)
    keys, values, spans, visible = exact_keys(method, len(positions), rope, cache, buffered, state, o, r)
    queries = rope.rows(q, positions + [C + r, method.far_row])
    scores = mx.where(visible[:, :, None, None], step_scores(queries, keys, method.scale, spans), -mx.inf)
    in_window = mx.array(np.arange(keys.shape[2]) < cache.keys.shape[2])
    top, both = mx.where(in_window, scores, -mx.inf).max(-1, keepdims=True), scores.max(-1, keepdims=True)
    exps = exp(scores - both)
    B, H = q.shape[:2]
    exact_num = by_kv_head(exps, lambda x: x @ values).reshape(B, H, 1, -1)
    exact_den = exps.sum(-1).reshape(B, H, 1, 1)
    linear = (q_features @ state[0]) * exp(method.log_decay * r)
    weight, own = mx.sigmoid(method.window_logit), exp(top - both).reshape(B, H, 1, 1)
    out = (weight * exact_num + own * linear[..., :-1]) / (weight * exact_den + own * linear[..., -1:])
    return out, [state[0], *buffered, *state[4:]]


def exact_keys(method, rows, rope, cache, buffered, state, o, r):
    """The keys and values a decode step attends exactly: the ring (sinks first), the pending
    block (rotated to its rows) and the cache; the query row that scores each span (`rows`: the
    step's own query rows, before the pending block's); and which keys are visible (the pending
    block's up to row r, past the sinks; the cache's filled slots)."""
    C, ring, kept_at = method.window, cache.keys.shape[2], state[7]
    keys = mx.concatenate([cache.keys.astype(mx.float32), rope(buffered[0][:, :, :C], 0), rope.along(state[4], method.slot_rows)], axis=2)
    values = mx.concatenate([cache.values.astype(mx.float32), buffered[1][:, :, :C], state[5]], axis=2)
    spans = ([(1, 0, method.sinks)] if method.sinks else []) + [(rows, ring, ring + C), (rows + 1, ring + C, keys.shape[2])]
    column = np.arange(C)
    pending = (mx.array(column) <= r) & (o - r - C + mx.array(column.astype(np.float32)) >= method.sinks)
    whole_ring = mx.array(np.ones((1, 1, ring), dtype=bool))
    shape = kept_at.shape[:2]
    pending = pending.reshape(-1, 1, C)  # one row for all, or one a sequence (a batch at its own positions)
    visible = mx.concatenate([mx.broadcast_to(x, shape + x.shape[-1:]) for x in (whole_ring, pending, kept_at >= 0)], axis=-1)
    return keys, values, spans, visible


def read_terms(method, rope, q, q_features, S, pending, kept, rows, by_block, near_offset):
    """Per query block (B, H, n, R, .): the state's numerator and denominator (decayed from the
    block's start to each row), then the exact keys' terms. `pending`, `kept`: raw keys, values
    and positions per query block; the pending keys lie from position 0, the queries from `near_offset`."""
    linear = (by_block(q_features) @ S) * exp(method.log_decay * rows)[:, None]
    near_q = by_block(rope(q, near_offset))  # so that q.k sees their true distance
    far_q = by_block(rope(q[..., None, :], method.far_row)[..., 0, :])
    keys = rope(pending[0].reshape(*pending[0].shape[:2], -1, pending[0].shape[-1]), 0).reshape(pending[0].shape)
    kept_keys = rope.along(kept[0], method.slot_rows)
    exact = exact_terms(near_q, far_q, rows, (keys, *pending[1:]), (kept_keys, *kept[1:]), method.sinks, method.scale)
    return mx.concatenate([linear, *exact], axis=-1)


def exact_terms(near_q, far_q, rows, pending, kept, sinks, scale):
    """Per query block (B, H, n, R, d), its rows' places in the block `rows` (R,):
    sum(exp(s - m) v), sum(exp(s - m)) and m over the keys of the block before that left the
    window (`pending`, from their true distance) and the cache (`kept`, rotated to their slots,
    read by `far_q`), m their largest score. Each: keys, values (B, Hkv, n, N, d), positions (B, Hkv, n, N)."""
    B, H, n, R, d = near_q.shape
    Hkv, C = pending[0].shape[1], pending[0].shape[3]
    by_group = lambda x: x.reshape(B, Hkv, H // Hkv, n, R, d) * scale  # noqa: E731
    scores = mx.concatenate([by_group(near_q) @ pending[0][:, :, None].swapaxes(-1, -2),
                             by_group(far_q) @ kept[0][:, :, None].swapaxes(-1, -2)], axis=-1)
    left_window = mx.arange(C)[None] <= rows[:, None]  # pending key c for the query at row r: c <= r
    visible = mx.concatenate([left_window & (pending[2][:, :, None, :, None] >= sinks),
                              mx.broadcast_to(kept[2][:, :, None, :, None] >= 0, (B, Hkv, 1, n, R, kept[2].shape[-1]))], axis=-1)
    scores = mx.where(visible, scores, -mx.inf)
    top = scores.max(axis=-1, keepdims=True)
    exps = exp(scores - mx.where(top > -mx.inf, top, 0))
    num = exps[..., :C] @ pending[1][:, :, None] + exps[..., C:] @ kept[1][:, :, None]
    return num.reshape(B, H, n, R, d), exps.sum(-1, keepdims=True).reshape(B, H, n, R, 1), top.reshape(B, H, n, R, 1)


def combine(terms, window, stats, weight):
    """LoLCATs' output with the exact keys in its shared denominator, all against one max."""
    d = window.shape[-1]
    num, den, exact_num, exact_den, exact_top = mx.split(terms, [d, d + 1, 2 * d + 1, 2 * d + 2], axis=-1)
    mass, top = stats[..., :1], stats[..., 1:]
    both = mx.maximum(top, exact_top)
    own, exact = exp(top - both), weight * exp(exact_top - both)
    return (own * (weight * mass * window + num) + exact * exact_num) / (own * (weight * mass + den) + exact * exact_den)

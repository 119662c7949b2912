"""Gated linear attention (GLA) scans in pure MLX, and gated slot attention (GSA) built on them.

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,    o_t = q_t S_t

Shapes: q (B, H, L, dk); k, log_g (B, Hs, L, dk); v (B, Hs, L, dv); state (B, Hs, dk, dv).
Hs is the number of state heads (the KV heads for Liger); the H query heads read the state of
head h // (H / Hs), as GQA does. log_g may have a last dimension of 1 (one decay per head).
The recurrent form is the oracle; the chunked form (design file, section 4) is what prefill and
training use without Metal. Both keep the state in float32 and are differentiable. On an Apple
GPU, gla_scan runs the Metal kernels of kernels.py instead.

GSA's first pass gates the state's columns instead of its rows (slot_recurrent, slot_chunked);
its second pass is gla_scan. See gsa_scan.
"""

import mlx.core as mx
import numpy as np

from . import kernels
from .fastmath import LOG2_E, exp, exp2, softmax

CHUNK = 64
SUB_CHUNK = 8
RECURRENT_MAX_LEN = 16
CARRY_GROUP = 64  # chunks whose carried states one matmul computes (its weights: n^2 per decayed dim)


def _group_queries(q, num_state_heads):
    """(B, H, ...) -> (B, Hs, H / Hs, ...): the query heads that read each state head."""
    return q.reshape(q.shape[0], num_state_heads, q.shape[1] // num_state_heads, *q.shape[2:])


def _initial_state(k, v, state):
    if state is not None:
        return state.astype(mx.float32)
    B, Hs, _, dk = k.shape
    return mx.zeros((B, Hs, dk, v.shape[-1]), dtype=mx.float32)


@mx.compile
def gla_step(q, k, v, log_g, state):
    """One token: q (B, Hs, R, dk), k and log_g (B, Hs, dk), v (B, Hs, dv)."""
    state = exp(log_g)[..., None] * state + k[..., :, None] * v[..., None, :]
    return q @ state, state


@mx.compile
def slot_step(q, k, s, log_g, state):
    """One token of GSA's first pass: log_g (B, Hs, M) decays the state's columns, the slots."""
    state = state * exp(log_g)[..., None, :] + k[..., :, None] * s[..., None, :]
    return q @ state, state


def _recurrent(step, q, k, v, log_g, state):
    B, H, L, _ = q.shape
    Hs, dv = k.shape[1], v.shape[-1]
    q = _group_queries(q, Hs).astype(mx.float32)
    k, v, log_g = (x.astype(mx.float32) for x in (k, v, log_g))
    state = _initial_state(k, v, state)
    outputs = []
    for t in range(L):
        o, state = step(q[:, :, :, t], k[:, :, t], v[:, :, t], log_g[:, :, t], state)
        outputs.append(o)
    o = mx.stack(outputs, axis=3) if L > 1 else outputs[0][:, :, :, None]  # a decode step: no copy
    return o.reshape(B, H, L, dv), state


def gla_recurrent(q, k, v, log_g, state=None):
    """Step through time; the oracle for every other implementation."""
    return _recurrent(gla_step, q, k, v, log_g, state)


def slot_recurrent(q, k, s, log_g, state=None):
    """S_t = S_{t-1} diag(exp(log_g_t)) + k_t^T s_t, o_t = q_t S_t, with s and log_g (B, Hs, L, M)
    and a (B, Hs, dk, M) state: the oracle of slot_chunked."""
    return _recurrent(slot_step, q, k, s, log_g, state)


def _sub_chunks(g, sub):
    """For each sub-chunk of the chunks: its start, its rows, the decays 2^(g_r - g_c) between its
    rows (0 where c > r) and the log-gate of the row before it (None for the first)."""
    causal = mx.tril(mx.ones((sub, sub), dtype=mx.bool_))[:, :, None]
    for start in range(0, g.shape[-2], sub):
        rows = slice(start, start + sub)
        g_i = g[..., rows, :]
        decay = exp2(mx.where(causal, g_i[..., :, None, :] - g_i[..., None, :, :], -mx.inf))
        yield start, rows, decay, g[..., start - 1 : start, :] if start else None


def _intra_chunk(q, k, v, g, sub):
    """Causal attention inside each chunk with decays 2^(g_r - g_c), every exponent <= 0.

    q (B, Hs, R, n, C, dk); k, g (B, Hs, n, C, dk); v (B, Hs, n, C, dv). Diagonal sub-chunks are
    computed element by element; earlier sub-chunks are referenced to the end of the previous one.
    """
    outputs = []
    for start, rows, decay, ref in _sub_chunks(g, sub):
        q_i, g_i, v_i = q[..., rows, :], g[..., rows, :], v[..., rows, :]
        k_diag = k[..., rows, :][..., None, :, :] * decay  # (B, Hs, n, s_r, s_c, dk)
        a_diag = q_i.transpose(0, 1, 3, 4, 2, 5) @ k_diag.swapaxes(-1, -2)
        o_i = a_diag.transpose(0, 1, 4, 2, 3, 5) @ v_i[:, :, None]
        if ref is not None:
            q_ref = q_i * exp2(g_i - ref)[:, :, None]
            k_ref = k[..., :start, :] * exp2(ref - g[..., :start, :])
            a_off = q_ref @ k_ref[:, :, None].swapaxes(-1, -2)
            o_i = o_i + a_off @ v[:, :, None, :, :start]
        outputs.append(o_i)
    return mx.concatenate(outputs, axis=-2)


def _slot_intra_chunk(q, k, s, g, sub):
    """o[r, m] = sum_{c<=r} (q_r . k_c) s[c, m] 2^(g[r, m] - g[c, m]) inside each chunk, every exponent
    <= 0: _intra_chunk's sub-chunks and reference rows, with the decays on the slots m."""
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, Hs, R, n, C, C)
    outputs = []
    for start, rows, decay, ref in _sub_chunks(g, sub):
        written = (decay * s[..., rows, :][..., None, :, :])[:, :, None]  # (B, Hs, 1, n, s_r, s_c, M)
        o_i = (scores[..., rows, rows, None] * written).sum(axis=-2)
        if ref is not None:
            s_ref = s[..., :start, :] * exp2(ref - g[..., :start, :])
            o_i = o_i + (scores[..., rows, :start] @ s_ref[:, :, None]) * exp2(g[..., rows, :] - ref)[:, :, None]
        outputs.append(o_i)
    return mx.concatenate(outputs, axis=-2)


def _split_chunks(q, k, v, log_g, chunk, gated):
    """float32 inputs padded to whole chunks, time split into (n, chunk), queries grouped by state
    head, and the base-2 cumulative log-gate within each chunk (broadcast to `gated`'s shape)."""
    pad = -q.shape[2] % chunk
    log_g = mx.broadcast_to(log_g, gated.shape)
    split = []
    for x in (q, k, v, log_g):
        # Zero keys and unit gates leave the state untouched in the padding.
        x = mx.pad(x.astype(mx.float32), [(0, 0), (0, 0), (0, pad), (0, 0)]) if pad else x.astype(mx.float32)
        split.append(x.reshape(*x.shape[:2], -1, chunk, x.shape[-1]))
    q, k, v, g = split
    return _group_queries(q, k.shape[1]), k, v, mx.cumsum(g * LOG2_E, axis=-2)


def _carry_group(state, log_decays, chunk_states):
    """_carry over n chunks in one matmul: S_i = 2^(L_(i-1)) S_0 + sum_(j<i) 2^(L_(i-1) - L_j) C_j, L the
    cumulative log2-decay; the decayed axis (rows or columns) is a batch axis of the sum over chunks."""
    rows, n = log_decays.shape[-1] == 1, log_decays.shape[2]
    ends = mx.cumsum(log_decays[..., 0] if rows else log_decays[..., 0, :], axis=2)  # (B, Hs, n, a)
    starts = mx.pad(ends, [(0, 0), (0, 0), (1, 0), (0, 0)])  # L_(i-1) for i = 0..n
    earlier = mx.array((np.arange(n + 1)[:, None] > np.arange(n)[None, :])[..., None])  # j < i
    weights = exp2(mx.where(earlier, starts[:, :, :, None] - ends[:, :, None], -mx.inf)).transpose(0, 1, 4, 2, 3)
    order = (0, 1, 3, 2, 4) if rows else (0, 1, 4, 2, 3)  # (B, Hs, a, n, b): the decayed axis first
    summed = (weights @ chunk_states.transpose(order)).transpose(order if rows else (0, 1, 3, 4, 2))
    initial = exp2(starts)[..., None] if rows else exp2(starts)[..., None, :]
    return initial * state[:, :, None] + summed  # (B, Hs, n + 1, ...): entering each chunk, then the last


def _carry(state, log_decays, chunk_states):
    """The state entering each chunk, (B, Hs, 1, n, ...) to broadcast over query groups, and the last:
    S_(i+1) = 2^(g_i) S_i + C_i, g_i (B, Hs, n, dk, 1) decaying rows or (B, Hs, n, 1, M) columns.
    Groups of chunks in one matmul each (not n sequential kernels), carried from group to group."""
    entering = []
    for start in range(0, chunk_states.shape[2], CARRY_GROUP):
        group = slice(start, start + CARRY_GROUP)
        states = _carry_group(state, log_decays[:, :, group], chunk_states[:, :, group])
        entering.append(states[:, :, :-1])
        state = states[:, :, -1]
    entering = entering[0] if len(entering) == 1 else mx.concatenate(entering, axis=2)
    return entering[:, :, None], state


def gla_chunked(q, k, v, log_g, state=None, chunk=CHUNK, sub_chunk=SUB_CHUNK):
    """Chunk-parallel GLA: equal to gla_recurrent, with O(L) sequential work of L / chunk steps."""
    B, H, L, _ = q.shape
    state = _initial_state(k, v, state)
    q, k, v, g = _split_chunks(q, k, v, log_g, chunk, gated=k)
    g_last = g[..., -1:, :]
    chunk_states = (k * exp2(g_last - g)).swapaxes(-1, -2) @ v  # (B, Hs, n, dk, dv)
    entering, state = _carry(state, g_last.swapaxes(-1, -2), chunk_states)
    o = (q * exp2(g)[:, :, None]) @ entering + _intra_chunk(q, k, v, g, sub_chunk)
    return o.reshape(B, H, -1, v.shape[-1])[:, :, :L], state


def slot_chunked(q, k, s, log_g, state=None, chunk=CHUNK, sub_chunk=SUB_CHUNK):
    """Chunk-parallel form of slot_recurrent: section 4 of the design file with the decays on the
    state's columns, so the inter-chunk read is (q S_prev) * 2^G and the intra-chunk decays act on s."""
    B, H, L, _ = q.shape
    state = _initial_state(k, s, state)
    q, k, s, g = _split_chunks(q, k, s, log_g, chunk, gated=s)
    g_last = g[..., -1:, :]
    chunk_states = k.swapaxes(-1, -2) @ (s * exp2(g_last - g))  # (B, Hs, n, dk, M)
    entering, state = _carry(state, g_last, chunk_states)
    o = (q @ entering) * exp2(g)[:, :, None] + _slot_intra_chunk(q, k, s, g, sub_chunk)
    return o.reshape(B, H, -1, s.shape[-1])[:, :, :L], state


def gla_scan(q, k, v, log_g, state=None):
    """Dispatch: a kernel where one runs (Apple GPU, any length, see kernels.py); otherwise the
    recurrent loop for short inputs (decode) and the chunked form for the rest."""
    kernel = kernels.scan_kernel()
    if kernel is not None:
        return kernel(q, k, v, mx.broadcast_to(log_g, k.shape), _initial_state(k, v, state))
    if q.shape[2] <= RECURRENT_MAX_LEN:
        return gla_recurrent(q, k, v, log_g, state)
    return gla_chunked(q, k, v, log_g, state)


def slot_scan(q, k, s, log_g, state=None):
    """Dispatch for GSA's first pass: MLX ops on every device (no kernel: gla_metal gates rows),
    the recurrent loop for short inputs and the chunked form for the rest."""
    if q.shape[2] <= RECURRENT_MAX_LEN:
        return slot_recurrent(q, k, s, log_g, state)
    return slot_chunked(q, k, s, log_g, state)


def gsa_scan(q, k, v, s, log_g, key_state=None, value_state=None):
    """Gated slot attention (fla's ops/gsa, scale 1): M slots per state head, one gate for both passes.

    The keys write the slot weights s (B, Hs, L, M) into a (dk, M) memory that the queries read as
    scores over the slots; their softmax reads, from a (M, dv) memory, the values s wrote there.
    Returns (output, key_state, value_state). The second pass is gla_scan, so it runs the Metal kernels.
    """
    scores, key_state = slot_scan(q, k, s, log_g, key_state)
    output, value_state = gla_scan(softmax(scores), s, v, log_g, value_state)
    return output, key_state, value_state

"""Gated linear attention (GLA) scans in pure MLX.

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,    o_t = q_t S_t

Shapes: q (B, H, L, dk); k, log_g (B, Hs, L, dk); v (B, Hs, L, dv); state (B, Hs, dk, dv).
Hs is the number of state heads (the KV heads for Liger); the H query heads read the state of
head h // (H / Hs), as GQA does. log_g may have a last dimension of 1 (one decay per head).
The recurrent form is the oracle; the chunked form (design file, section 4) is what prefill and
training use without Metal. Both keep the state in float32 and are differentiable. On an Apple
GPU, gla_scan runs the Metal kernels of kernels.py instead.
"""

import mlx.core as mx

from . import kernels

CHUNK = 64
SUB_CHUNK = 8
RECURRENT_MAX_LEN = 16
LOG2_E = 1.4426950408889634


def exp2(x):
    # 2^x through pow: ~2.5x faster than exp on MLX's CPU backend, as accurate.
    return mx.power(2.0, x)


def _group_queries(q, num_state_heads):
    B, H, L, dk = q.shape
    return q.reshape(B, num_state_heads, H // num_state_heads, L, dk)


def _initial_state(k, v, state):
    if state is not None:
        return state.astype(mx.float32)
    B, Hs, _, dk = k.shape
    return mx.zeros((B, Hs, dk, v.shape[-1]), dtype=mx.float32)


@mx.compile
def gla_step(q, k, v, log_g, state):
    """One token: q (B, Hs, R, dk), k and log_g (B, Hs, dk), v (B, Hs, dv)."""
    state = mx.exp(log_g)[..., None] * state + k[..., :, None] * v[..., None, :]
    return q @ state, state


def gla_recurrent(q, k, v, log_g, state=None):
    """Step through time; the oracle for every other implementation."""
    B, H, L, _ = q.shape
    Hs, dv = k.shape[1], v.shape[-1]
    q = _group_queries(q, Hs).astype(mx.float32)
    k, v, log_g = (x.astype(mx.float32) for x in (k, v, log_g))
    state = _initial_state(k, v, state)
    outputs = []
    for t in range(L):
        o, state = gla_step(q[:, :, :, t], k[:, :, t], v[:, :, t], log_g[:, :, t], state)
        outputs.append(o)
    return mx.stack(outputs, axis=3).reshape(B, H, L, dv), state


def _intra_chunk(q, k, v, g, sub):
    """Causal attention inside each chunk with decays 2^(g_r - g_c), every exponent <= 0.

    q (B, Hs, R, n, C, dk); k, g (B, Hs, n, C, dk); v (B, Hs, n, C, dv). Diagonal sub-chunks are
    computed element by element; earlier sub-chunks are referenced to the end of the previous one.
    """
    C = k.shape[-2]
    causal = mx.tril(mx.ones((sub, sub), dtype=mx.bool_))[:, :, None]
    outputs = []
    for start in range(0, C, sub):
        rows = slice(start, start + sub)
        q_i, g_i, v_i = q[..., rows, :], g[..., rows, :], v[..., rows, :]
        diff = g_i[..., :, None, :] - g_i[..., None, :, :]
        decay = exp2(mx.where(causal, diff, -mx.inf))
        k_diag = k[..., rows, :][..., None, :, :] * decay  # (B, Hs, n, s_r, s_c, dk)
        a_diag = q_i.transpose(0, 1, 3, 4, 2, 5) @ k_diag.swapaxes(-1, -2)
        o_i = a_diag.transpose(0, 1, 4, 2, 3, 5) @ v_i[:, :, None]
        if start > 0:
            ref = g[..., start - 1 : start, :]
            q_ref = q_i * exp2(g_i - ref)[:, :, None]
            k_ref = k[..., :start, :] * exp2(ref - g[..., :start, :])
            a_off = q_ref @ k_ref[:, :, None].swapaxes(-1, -2)
            o_i = o_i + a_off @ v[:, :, None, :, :start]
        outputs.append(o_i)
    return mx.concatenate(outputs, axis=-2)


def gla_chunked(q, k, v, log_g, state=None, chunk=CHUNK, sub_chunk=SUB_CHUNK):
    """Chunk-parallel GLA: equal to gla_recurrent, with O(L) sequential work of L / chunk steps."""
    B, H, L, dk = q.shape
    Hs, dv = k.shape[1], v.shape[-1]
    R = H // Hs
    state = _initial_state(k, v, state)
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    log_g = mx.broadcast_to(log_g.astype(mx.float32), k.shape)
    pad = -L % chunk
    if pad:
        # Zero keys and unit gates leave the state untouched in the padding.
        widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
        q, k, v, log_g = (mx.pad(x, widths) for x in (q, k, v, log_g))
    n = (L + pad) // chunk
    q = q.reshape(B, Hs, R, n, chunk, dk)
    k = k.reshape(B, Hs, n, chunk, dk)
    v = v.reshape(B, Hs, n, chunk, dv)
    g = mx.cumsum(log_g.reshape(B, Hs, n, chunk, dk) * LOG2_E, axis=-2)  # base-2 log decays

    g_last = g[..., -1:, :]
    chunk_states = (k * exp2(g_last - g)).swapaxes(-1, -2) @ v  # (B, Hs, n, dk, dv)
    chunk_decays = exp2(g_last).swapaxes(-1, -2)  # (B, Hs, n, dk, 1)
    entering = []
    for i in range(n):
        entering.append(state)
        state = chunk_decays[:, :, i] * state + chunk_states[:, :, i]
    entering = mx.stack(entering, axis=2)[:, :, None]  # (B, Hs, 1, n, dk, dv)

    o = (q * exp2(g)[:, :, None]) @ entering
    o = o + _intra_chunk(q, k, v, g, sub_chunk)
    return o.reshape(B, H, n * chunk, dv)[:, :, :L], state


def gla_scan(q, k, v, log_g, state=None):
    """Dispatch: a kernel where one runs (Apple GPU, any length, see kernels.py); otherwise the
    recurrent loop for short inputs (decode) and the chunked form for the rest."""
    kernel = kernels.scan_kernel()
    if kernel is not None:
        return kernel(q, k, v, mx.broadcast_to(log_g, k.shape), _initial_state(k, v, state))
    if q.shape[2] <= RECURRENT_MAX_LEN:
        return gla_recurrent(q, k, v, log_g, state)
    return gla_chunked(q, k, v, log_g, state)

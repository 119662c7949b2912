"""Chunked == recurrent == masked quadratic form, forward and gradients."""

import mlx.core as mx
import pytest

from mlx_linear.scan import gla_chunked, gla_recurrent

from conftest import make_inputs


def quadratic(q, k, v, log_g, state):
    """o_r = sum_{c<=r} (q_r * exp(G_r - G_c)) . k_c v_c + (q_r * exp(G_r)) S_0, G the cumulative log-gate."""
    B, H, L, dk = q.shape
    Hs = k.shape[1]
    rep = H // Hs
    k, v, log_g, state = (mx.repeat(x, rep, axis=1) for x in (k, v, log_g, state))
    G = mx.cumsum(log_g, axis=2)
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))[:, :, None]
    decay = mx.exp(mx.where(causal, G[:, :, :, None, :] - G[:, :, None, :, :], -mx.inf))  # (B, H, r, c, dk)
    scores = mx.sum(q[:, :, :, None, :] * k[:, :, None, :, :] * decay, axis=-1)
    out = scores @ v + (q * mx.exp(G)) @ state
    final = mx.exp(G[:, :, -1])[..., None] * state + (k * mx.exp(G[:, :, -1:] - G)).swapaxes(-1, -2) @ v
    return out, final[:, ::rep]


SHAPES = [(1, 2, 2, 1, 32), (2, 4, 2, 7, 32), (1, 6, 2, 64, 64), (2, 4, 1, 65, 32), (1, 4, 2, 300, 64)]


@pytest.mark.parametrize("B,H,Hs,L,d", SHAPES)
def test_forward_matches(B, H, Hs, L, d):
    inputs = make_inputs(B, H, Hs, L, d, seed=L)
    o_ref, s_ref = quadratic(*inputs)
    for scan in (gla_recurrent, gla_chunked):
        o, s = scan(*inputs)
        assert mx.allclose(o, o_ref, atol=2e-4, rtol=1e-4).item(), scan.__name__
        assert mx.allclose(s, s_ref, atol=2e-4, rtol=1e-4).item(), scan.__name__


@pytest.mark.parametrize("B,H,Hs,L,d", SHAPES)
def test_gradients_match(B, H, Hs, L, d):
    inputs = make_inputs(B, H, Hs, L, d, seed=L + 1)
    mx.random.seed(99)
    w_out = mx.random.normal((B, H, L, d))
    w_state = mx.random.normal((B, Hs, d, d))

    def loss(scan):
        def f(*args):
            o, s = scan(*args)
            return mx.sum(o * w_out) + mx.sum(s * w_state)

        return mx.grad(f, argnums=(0, 1, 2, 3, 4))(*inputs)

    reference = loss(quadratic)
    for scan in (gla_recurrent, gla_chunked):
        for g, g_ref in zip(loss(scan), reference):
            assert mx.allclose(g, g_ref, atol=1e-3, rtol=1e-3).item(), scan.__name__


def test_scalar_decay_broadcasts():
    q, k, v, log_g, state = make_inputs(1, 4, 2, 70, 32, seed=3)
    scalar = log_g[..., :1]
    o_ref, s_ref = quadratic(q, k, v, mx.broadcast_to(scalar, log_g.shape), state)
    o, s = gla_chunked(q, k, v, scalar, state)
    assert mx.allclose(o, o_ref, atol=2e-4).item() and mx.allclose(s, s_ref, atol=2e-4).item()


def test_strongly_negative_gates_do_not_overflow():
    """20k steps of gates near exp(-60): the state forgets all but the current token."""
    L, d = 20_000, 32
    q, k, v, _, _ = make_inputs(1, 2, 1, L, d, seed=5)
    log_g = mx.full((1, 1, L, d), -60.0)
    o, s = gla_chunked(q, k, v, log_g)
    assert mx.isfinite(o).all().item() and mx.isfinite(s).all().item()
    current_only = mx.sum(q * k, axis=-1, keepdims=True) * v  # o_t = (q_t . k_t) v_t
    assert mx.allclose(o, current_only, atol=1e-5).item()
    assert mx.allclose(s[0, 0], k[0, 0, -1][:, None] * v[0, 0, -1][None], atol=1e-6).item()

"""Chunked == recurrent == masked quadratic form, forward and gradients: GLA, GSA's slot pass, GSA."""

import mlx.core as mx
import pytest

from mlx_linear.scan import gla_chunked, gla_recurrent, gsa_scan, slot_chunked, slot_recurrent

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


def slot_quadratic(q, k, s, log_g, state):
    """o_r[m] = sum_{c<=r} (q_r . k_c) s_c[m] exp(G_r[m] - G_c[m]) + (q_r S_0)[m] exp(G_r[m]): the
    gates act on the slots m (the state's columns), not on the key dims."""
    L, rep = q.shape[2], q.shape[1] // k.shape[1]
    k, s, log_g, state = (mx.repeat(x, rep, axis=1) for x in (k, s, log_g, state))
    G = mx.cumsum(log_g, axis=2)
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))[:, :, None]
    decay = mx.exp(mx.where(causal, G[:, :, :, None, :] - G[:, :, None, :, :], -mx.inf))  # (B, H, r, c, M)
    scores = q @ k.swapaxes(-1, -2)
    out = (scores[..., None] * decay * s[:, :, None]).sum(axis=3) + (q @ state) * mx.exp(G)
    final = state * mx.exp(G[:, :, -1:]) + k.swapaxes(-1, -2) @ (s * mx.exp(G[:, :, -1:] - G))
    return out, final[:, ::rep]


def gsa_quadratic(q, k, v, s, log_g, key_state, value_state):
    """fla's GSA: the slot pass, a softmax over the slots, then GLA with the slots as keys."""
    scores, key_state = slot_quadratic(q, k, s, log_g, key_state)
    out, value_state = quadratic(mx.softmax(scores, axis=-1), s, v, log_g, value_state)
    return out, key_state, value_state


def slot_inputs(B, H, Hs, L, d, seed):
    """Raw queries and keys (as Liger-GSA's), slot weights and log-gates over d // 2 slots, a state."""
    q, k, _, _, state = make_inputs(B, H, Hs, L, d, seed)
    log_g = mx.log(mx.sigmoid(2 * mx.random.normal((B, Hs, L, d // 2)))) / 4
    return mx.random.normal(q.shape), mx.random.normal(k.shape), 1 - mx.exp(log_g), log_g, state[..., : d // 2]


def gsa_inputs(B, H, Hs, L, d, seed):
    q, k, s, log_g, key_state = slot_inputs(B, H, Hs, L, d, seed)
    v, value_state = mx.random.normal((B, Hs, L, d)), mx.random.normal((B, Hs, d // 2, d))
    return q, k, v, s, log_g, key_state, value_state


FAMILIES = {  # reference, the implementations it checks, their inputs
    "gla": (quadratic, (gla_recurrent, gla_chunked), make_inputs),
    "slot": (slot_quadratic, (slot_recurrent, slot_chunked), slot_inputs),
    "gsa": (gsa_quadratic, (gsa_scan,), gsa_inputs),  # recurrent up to 16 tokens, chunked past
}
SHAPES = [(1, 2, 2, 1, 32), (2, 4, 2, 7, 32), (1, 6, 2, 64, 64), (2, 4, 1, 65, 32), (1, 4, 2, 300, 64)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B,H,Hs,L,d", SHAPES)
def test_forward_matches(family, B, H, Hs, L, d):
    reference, scans, make = FAMILIES[family]
    inputs = make(B, H, Hs, L, d, seed=L)
    expected = reference(*inputs)
    for scan in scans:
        for x, x_ref in zip(scan(*inputs), expected, strict=True):
            assert mx.allclose(x, x_ref, atol=2e-4, rtol=1e-4).item(), scan.__name__


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B,H,Hs,L,d", SHAPES)
def test_gradients_match(family, B, H, Hs, L, d):
    reference, scans, make = FAMILIES[family]
    inputs = make(B, H, Hs, L, d, seed=L + 1)
    mx.random.seed(99)
    weights = [mx.random.normal(x.shape) for x in reference(*inputs)]

    def grads(scan):
        def f(*args):
            return sum(mx.sum(x * w) for x, w in zip(scan(*args), weights, strict=True))

        return mx.grad(f, argnums=tuple(range(len(inputs))))(*inputs)

    expected = grads(reference)
    for scan in scans:
        for g, g_ref in zip(grads(scan), expected):
            assert mx.allclose(g, g_ref, atol=1e-3, rtol=1e-3).item(), scan.__name__


@pytest.mark.parametrize("family", ["gla", "slot"])
def test_chunks_carried_group_by_group(monkeypatch, family):
    """Past CARRY_GROUP chunks the carried states are computed a group at a time (here 2 chunks)."""
    from mlx_linear import scan

    monkeypatch.setattr(scan, "CARRY_GROUP", 2)
    reference, (_, chunked), make = FAMILIES[family]
    inputs = make(1, 4, 2, 300, 32, seed=7)
    for x, x_ref in zip(chunked(*inputs), reference(*inputs), strict=True):
        assert mx.allclose(x, x_ref, atol=2e-4, rtol=1e-4).item()


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


def test_slot_pass_with_strongly_negative_gates_does_not_overflow():
    """Slot gates near exp(-60) for 2k steps: each slot holds the current token alone."""
    q, k, s, _, _ = slot_inputs(1, 2, 1, 2000, 32, seed=6)
    o, state = slot_chunked(q, k, s, mx.full(s.shape, -60.0))
    assert mx.isfinite(o).all().item() and mx.isfinite(state).all().item()
    assert mx.allclose(o, mx.sum(q * k, axis=-1, keepdims=True) * s, atol=1e-4, rtol=1e-4).item()

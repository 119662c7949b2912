"""Blocked sliding-window attention against a full masked softmax."""

import mlx.core as mx
import pytest

from mlx_linear.window import sliding_window_attention


def masked_attention(q, k, v, window, scale, sinks=0):
    """Keys are positions 0..P+L-1; query i is at position P + i."""
    B, H, L, _ = q.shape
    earlier = k.shape[2] - L
    k, v = (mx.repeat(x, H // k.shape[1], axis=1) for x in (k, v))
    query_pos = mx.arange(L)[:, None] + earlier
    key_pos = mx.arange(k.shape[2])[None]
    visible = (key_pos <= query_pos) & ((key_pos > query_pos - window) | (key_pos < sinks))
    scores = mx.where(visible, (q * scale) @ k.swapaxes(-1, -2), -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


@pytest.mark.parametrize("L,earlier,window", [(1, 0, 64), (1, 63, 64), (5, 0, 64), (64, 0, 64), (65, 10, 64), (200, 63, 64), (37, 7, 8)])
def test_matches_masked_softmax(L, earlier, window):
    mx.random.seed(L + earlier)
    q = mx.random.normal((2, 6, L, 16))
    k = mx.random.normal((2, 3, earlier + L, 16))
    v = mx.random.normal((2, 3, earlier + L, 16))
    out = sliding_window_attention(q, k, v, window, 0.25)
    assert mx.allclose(out, masked_attention(q, k, v, window, 0.25), atol=1e-5).item()
    if L > window:  # a window one shorter is a different function
        assert not mx.allclose(out, masked_attention(q, k, v, window - 1, 0.25), atol=1e-3).item()


@pytest.mark.parametrize("L,sinks,window", [(40, 4, 8), (200, 1, 64), (9, 4, 8), (3, 2, 8)])
def test_sinks_match_masked_softmax(L, sinks, window):
    """From position 0 (training, first prefill): sinks are the sequence's first keys."""
    mx.random.seed(L)
    q = mx.random.normal((1, 4, L, 16))
    k, v = mx.random.normal((1, 2, L, 16)), mx.random.normal((1, 2, L, 16))
    sink_kv = (k[..., :sinks, :], v[..., :sinks, :])
    out = sliding_window_attention(q, k, v, window, 0.25, sink_kv, first_position=0)
    assert mx.allclose(out, masked_attention(q, k, v, window, 0.25, sinks), atol=1e-5).item()


def test_sinks_after_dropped_tokens():
    """Later prefill: sinks 0..S-1, then the W - 1 keys before the L current ones (positions 93..)."""
    S, W, L, first = 2, 8, 20, 100
    mx.random.seed(1)
    k_all, v_all = mx.random.normal((1, 2, first + L, 16)), mx.random.normal((1, 2, first + L, 16))
    q_all = mx.random.normal((1, 4, first + L, 16))
    expected = masked_attention(q_all, k_all, v_all, W, 0.25, S)[:, :, first:]
    recent = slice(first - (W - 1), first + L)
    sinks = (k_all[..., :S, :], v_all[..., :S, :])
    out = sliding_window_attention(q_all[:, :, first:], k_all[:, :, recent], v_all[:, :, recent], W, 0.25, sinks, first)
    assert mx.allclose(out, expected, atol=1e-5).item()

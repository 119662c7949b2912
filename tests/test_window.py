"""Blocked sliding-window attention against a full masked softmax."""

import mlx.core as mx
import pytest

from mlx_linear.window import sliding_window_attention


def masked_attention(q, k, v, window, scale):
    B, H, L, _ = q.shape
    earlier = k.shape[2] - L
    k, v = (mx.repeat(x, H // k.shape[1], axis=1) for x in (k, v))
    query_pos = mx.arange(L)[:, None] + earlier
    key_pos = mx.arange(k.shape[2])[None]
    visible = (key_pos <= query_pos) & (key_pos > query_pos - window)
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

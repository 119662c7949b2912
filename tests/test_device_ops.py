"""The MLX op forms the model's sink and window paths use, each against float64 numpy, on MLX's
default device: on a GPU a failure here names the op whose kernel differs from the CPU's, where
the model-level tests (windows with sinks) only say that something does."""

import mlx.core as mx
import numpy as np
import pytest

RNG = np.random.default_rng(0)


def as_np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def rope_reference(x, position, base=10000.0):
    """Non-traditional RoPE of x (..., d) at `position` (broadcast over the leading dims)."""
    h = x.shape[-1] // 2
    theta = np.asarray(position, dtype=np.float64)[..., None] * base ** (-np.arange(h) / h)
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x1 * np.sin(theta) + x2 * np.cos(theta)], -1)


def test_rope_of_a_five_dimensional_strided_view():
    """rope(q[..., None, :]) of a transposed q: every query at one position (the sinks' horizon)."""
    q = mx.array(RNG.normal(size=(2, 5, 3, 16)).astype(np.float32)).transpose(0, 2, 1, 3)  # (B, H, L, d), strided
    got = mx.fast.rope(q[..., None, :], 16, traditional=False, base=10000.0, scale=1.0, offset=9)[..., 0, :]
    np.testing.assert_allclose(as_np(got), rope_reference(as_np(q), 9), atol=1e-5)


@pytest.mark.parametrize("narrow", [1, 2, 4])
def test_matmul_with_broadcast_batches_and_a_narrow_side(narrow):
    """Sink scores and outputs: queries (B, Hkv, R, n, W, d) against a few keys broadcast over
    the query groups and blocks, and weights sliced to those keys."""
    queries = mx.array(RNG.normal(size=(2, 3, 2, 4, 8, 16)).astype(np.float32))
    keys = mx.array(RNG.normal(size=(2, 3, narrow, 16)).astype(np.float32))
    scores = queries @ keys[:, :, None, None].swapaxes(-1, -2)
    np.testing.assert_allclose(as_np(scores), as_np(queries) @ np.swapaxes(as_np(keys)[:, :, None, None], -1, -2), atol=1e-4)
    weights = mx.array(RNG.normal(size=(2, 3, 2, 4, 8, narrow + 24)).astype(np.float32))
    got = weights[..., :narrow] @ keys[:, :, None, None]
    np.testing.assert_allclose(as_np(got), as_np(weights)[..., :narrow] @ as_np(keys)[:, :, None, None], atol=1e-4)


def test_one_query_against_a_sliced_transposed_cache():
    """A decode step's scores: (B, Hkv, R, 1, d) @ keys[:, :, None].swapaxes(-1, -2)[..., :S]."""
    q = mx.array(RNG.normal(size=(1, 3, 2, 1, 16)).astype(np.float32))
    k = mx.array(RNG.normal(size=(1, 3, 10, 16)).astype(np.float32))
    keys = k[:, :, None].swapaxes(-1, -2)
    for columns in (slice(None), slice(0, 2)):
        expected = as_np(q) @ np.swapaxes(as_np(k)[:, :, None], -1, -2)[..., columns]
        np.testing.assert_allclose(as_np(q @ keys[..., columns]), expected, atol=1e-4)


def test_slice_update_at_an_array_position():
    """The compiled step writes its key into the ring buffer at an array slot."""
    ring = mx.array(RNG.normal(size=(1, 2, 6, 4)).astype(np.float32))
    new = mx.array(RNG.normal(size=(1, 2, 1, 4)).astype(np.float32))
    got = mx.compile(lambda r, x, slot: mx.slice_update(r, x, slot, axes=(2,)))(ring, new, mx.array(3))
    expected = as_np(ring).copy()
    expected[:, :, 3:4] = as_np(new)
    np.testing.assert_array_equal(as_np(got), expected)


@pytest.mark.parametrize("rows", [2, 4])
def test_query_rows_against_keys_broadcast_over_the_group(rows):
    """(B, Hkv, R, P, d) @ (B, Hkv, 1, d, N): keys shared by a KV head's query heads as a stride-0
    batch axis (the form this release's decode step folds into one matmul instead)."""
    queries = mx.array(RNG.normal(size=(1, 3, 2, rows, 16)).astype(np.float32))
    keys = mx.array(RNG.normal(size=(1, 3, 12, 16)).astype(np.float32))
    got = queries @ keys[:, :, None].swapaxes(-1, -2)
    np.testing.assert_allclose(as_np(got), as_np(queries) @ np.swapaxes(as_np(keys)[:, :, None], -1, -2), atol=1e-4)

"""fastmath's 2^x forms against float64 numpy (the math) and MLX's own ops (forward, gradients)."""

import mlx_linear  # noqa: F401  (BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import cpu_only
from mlx_linear import fastmath

VALUES = np.concatenate([np.linspace(-87, 87, 2001), [-1e-8, 0.0, 1e-8, -120.0, 120.0]]).astype(np.float32)


@cpu_only
def test_runs_the_power_of_two_path_on_the_cpu():
    assert fastmath.on_cpu()  # what follows tests the 2^x forms here, MLX's fused ops on a GPU


def test_exp_against_float64():
    reference = np.exp(VALUES.astype(np.float64))
    got = np.array(fastmath.exp(mx.array(VALUES)))
    normal = (reference > np.finfo(np.float32).tiny) & (reference < np.finfo(np.float32).max)
    # x * log2(e) rounds to float32: a relative error of about |x| ulp, as MLX's own exp has
    np.testing.assert_allclose(got[normal], reference[normal], rtol=4e-6, atol=0)
    assert np.isinf(got[VALUES == 120]).all() and got[VALUES == -120].item() == 0
    assert fastmath.exp(mx.array(-np.inf)).item() == 0


def test_log_sigmoid_against_float64():
    x = VALUES.astype(np.float64)
    reference = np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))
    got = np.array(fastmath.log_sigmoid(mx.array(VALUES)))
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("width", [64, 1024])  # a decode step's size (MLX's op), a prefill's (2^x)
def test_softmax_against_float64_and_mlx(axis, width):
    x = np.random.default_rng(0).normal(scale=8, size=(3, 7, width)).astype(np.float32)
    x[0, 0, :5] = -np.inf  # masked scores
    wide = x.astype(np.float64)
    exps = np.exp(wide - wide.max(axis=axis, keepdims=True))
    got = np.array(fastmath.softmax(mx.array(x), axis=axis))
    np.testing.assert_allclose(got, exps / exps.sum(axis=axis, keepdims=True), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(got, np.array(mx.softmax(mx.array(x), axis=axis)), rtol=2e-6, atol=1e-9)


def test_gradients_equal_mlx_ops():
    x = mx.array(np.random.default_rng(1).normal(scale=4, size=(5, 32)).astype(np.float32))
    w = mx.array(np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32))
    pairs = [(fastmath.exp, mx.exp), (fastmath.softmax, lambda t: mx.softmax(t, axis=-1)), (fastmath.log_sigmoid, nn.log_sigmoid)]
    for ours, theirs in pairs:
        grads = [mx.grad(lambda t, f=f: (f(t) * w).sum())(x) for f in (ours, theirs)]
        np.testing.assert_allclose(np.array(grads[0]), np.array(grads[1]), rtol=1e-5, atol=1e-6)


def test_softmax_gradient_of_the_power_of_two_path_against_float64():
    """Past the fused op's sizes: d/dx sum(softmax(x) w) = s (w - sum(s w)), in float64."""
    size = (5, 2 * fastmath.FUSED_SOFTMAX_UP_TO // 5)
    x = np.random.default_rng(1).normal(scale=4, size=size)
    w = np.random.default_rng(2).normal(size=size)
    s = np.exp(x - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    reference = s * (w - (s * w).sum(-1, keepdims=True))
    got = mx.grad(lambda t: (fastmath.softmax(t) * mx.array(w, dtype=mx.float32)).sum())(mx.array(x, dtype=mx.float32))
    # sum(s w) rounds in float32 over the row: ~sqrt(width) ulps of max|w|
    atol = np.sqrt(size[1]) * np.finfo(np.float32).eps * np.abs(w).max()
    np.testing.assert_allclose(np.array(got), reference, rtol=1e-5, atol=atol)

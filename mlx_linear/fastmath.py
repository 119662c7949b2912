"""exp, softmax and log-sigmoid through 2^x on the CPU.

MLX's CPU exp runs at ~70-85M elements/s and power(2, x) at ~140-220M (a multiply: ~3,500M),
so the feature maps, gates and window softmaxes, a large share of a prefill step there, run
~2x faster as powers of two, within a float32 rounding of MLX's own. On a GPU, MLX's fused ops are used,
and so are they for a softmax as small as a decode step's, where one op beats four fast ones.
"""

import mlx.core as mx
import mlx.nn as nn

LOG2_E = 1.4426950408889634
FUSED_SOFTMAX_UP_TO = 1 << 14  # elements: a decode step's (mx.softmax: ~80M elements/s here, 2^x ~150M)


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def exp2(x):
    return mx.power(2.0, x)


def exp(x):
    return exp2(x * LOG2_E) if on_cpu() else mx.exp(x)


def softmax(x, axis=-1):
    if not on_cpu() or x.size <= FUSED_SOFTMAX_UP_TO:
        return mx.softmax(x, axis=axis)
    exps = exp(x - x.max(axis=axis, keepdims=True))
    return exps / exps.sum(axis=axis, keepdims=True)


def log_sigmoid(x):
    # min(x, 0) - log(1 + e^-|x|): no overflow either side, one exponential
    if not on_cpu():
        return nn.log_sigmoid(x)
    return mx.minimum(x, 0) - mx.log1p(exp(-mx.abs(x)))

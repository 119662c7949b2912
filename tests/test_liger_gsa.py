"""Liger-GSA against the released code's recurrence, token by token (scan.gsa_scan's own
chunked == recurrent == quadratic checks are in test_scan.py), and its pooling and state."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_linear.methods.liger_gsa import adaptive_pool_matrix

from conftest import TINY, assert_follows, cache_bytes, mixed_output, reference_window, tiny_model


def pool(k, slots):
    """AdaptiveAvgPool1d per head (its bins never straddle two heads): slot i averages key dims
    floor(i d / M) to ceil((i + 1) d / M) - 1."""
    d = k.shape[-1]
    bins = [(i * d // slots, math.ceil((i + 1) * d / slots)) for i in range(slots)]
    return mx.stack([k[..., a:b].mean(-1) for a, b in bins], axis=-1)


def reference_gsa(attn, x, window=8, sinks=0, slots=None, mix=0.5):
    """Per query head: a = sigmoid(pool(k))^(1/16), s = 1 - a; keys into slots, a softmax over the
    slots, slots into values, each memory decayed by a before the token writes; then the mix."""
    B, L, _ = x.shape
    H, Hkv = attn.n_heads, attn.n_kv_heads
    q, k, v = attn.project(x)
    d = q.shape[-1]
    M = slots or d
    a = mx.exp(nn.log_sigmoid(pool(k, M)) / 16)
    k, v, a = (mx.repeat(t, H // Hkv, axis=1) for t in (k, v, a))
    s = 1 - a
    key_memory, value_memory = mx.zeros((B, H, d, M)), mx.zeros((B, H, M, d))
    outputs = []
    for t in range(L):
        key_memory = key_memory * a[:, :, t, None, :] + k[:, :, t, :, None] * s[:, :, t, None, :]
        weights = mx.softmax((q[:, :, t, None, :] @ key_memory)[:, :, 0], axis=-1)
        value_memory = value_memory * a[:, :, t, :, None] + s[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((weights[:, :, None, :] @ value_memory)[:, :, 0])
    return mixed_output(attn, mx.stack(outputs, axis=2), reference_window(attn, x, window, sinks), mix)


@pytest.mark.parametrize("model_type,sinks,slots", [("llama", 0, None), ("qwen3", 2, None), ("llama", 0, 6)])
def test_follows_the_released_code(model_type, sinks, slots):
    options = {"slots": slots} if slots else {}
    attn = tiny_model(model_type, sinks=sinks, method="liger-gsa", options=options).layers[1].self_attn
    assert_follows(attn, lambda x: reference_gsa(attn, x, sinks=sinks, slots=slots))


def test_learned_mix_weighs_each_head():
    attn = tiny_model(method="liger-gsa", options={"mix": 0.2, "learned_mix": True}).layers[1].self_attn
    assert mx.allclose(attn.method.mix_weight(), mx.array(0.2)).item()  # it starts at `mix`
    attn.method.mix_logit = mx.random.normal((TINY["num_attention_heads"], 1, 1))  # as if trained
    mix = 1 / (1 + mx.exp(-attn.method.mix_logit))
    assert_follows(attn, lambda x: reference_gsa(attn, x, mix=mix))


def test_pooling_is_pytorchs_adaptive_average():
    # AdaptiveAvgPool1d(3) of 5 inputs: bins [0, 2), [1, 4), [3, 5), overlapping.
    expected = mx.array([[1 / 2, 0, 0], [1 / 2, 1 / 3, 0], [0, 1 / 3, 0], [0, 1 / 3, 1 / 2], [0, 0, 1 / 2]])
    assert mx.allclose(adaptive_pool_matrix(5, 3), expected).item()
    assert mx.array_equal(adaptive_pool_matrix(4, 4), mx.eye(4)).item()  # the default: the identity


def test_state_size_is_constant_and_counts_the_slots():
    sizes = cache_bytes(tiny_model(method="liger-gsa", options={"slots": 6}))
    Hkv, d, W = TINY["num_key_value_heads"], TINY["head_dim"], 8
    assert sizes[0] == sizes[1] == TINY["num_hidden_layers"] * 4 * Hkv * (2 * d * 6 + 2 * W * d)


def test_no_parameters_and_bad_slots():
    assert tiny_model(method="liger-gsa").layers[0].self_attn.method.parameters() == {}
    for slots in (-1, 2.5):
        with pytest.raises(ValueError, match=f"slots={slots}: give a whole number"):
            tiny_model(method="liger-gsa", options={"slots": slots})

"""LoLCATs against the design's quadratic form (section 3), token by token, and its caches."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import TINY, assert_pieces_match_one_forward, cache_bytes, tiny_model

WINDOW = 8


def lolcats_model(model_type="llama", sinks=0, method="lolcats", seed=0, sink_horizon=0, **options):
    model = tiny_model(model_type, method=method, sinks=sinks, seed=seed, sink_horizon=sink_horizon, options=options)
    for layer in model.layers:  # move the maps and factors off their initial values
        method = layer.self_attn.method
        method.q_map = method.q_map + 0.3 * mx.random.normal(method.q_map.shape)
        method.k_map = method.k_map + 0.3 * mx.random.normal(method.k_map.shape)
        method.window_logit = mx.random.normal(method.window_logit.shape)
    return model


def reference_lolcats(attn, x, sinks=0, half_life=0, after_rope=True):
    """y_t = (g sum_win exp(s - max) v + sum_{s <= t-W} phi(q).phi(k) v) / (same without v)."""
    B, L, _ = x.shape
    H, Hkv, m = attn.n_heads, attn.n_kv_heads, attn.method
    q, k, v = attn.project(x)  # the pretrained projections (and Qwen3 norms), per head
    k, v = mx.repeat(k, H // Hkv, axis=1), mx.repeat(v, H // Hkv, axis=1)
    qr, kr = attn.rope(q), attn.rope(k)

    def phi(x, w):
        y = x @ w
        return mx.concatenate([mx.softmax(y, axis=-1), mx.softmax(-y, axis=-1)], axis=-1)

    mapped_q, mapped_k = (qr, kr) if after_rope else (q, k)
    fq, fk, g = phi(mapped_q, m.q_map), phi(mapped_k, m.k_map), mx.sigmoid(m.window_logit)[None, :, :, 0]
    d = q.shape[-1]
    outputs = []
    for t in range(L):
        recent = list(range(max(0, t - WINDOW + 1), t + 1))
        old_sinks = [u for u in range(min(sinks, t + 1)) if u not in recent]
        q_sink = attn.rope(q[:, :, t : t + 1], offset=min(t, WINDOW + sinks - 1))[:, :, 0]
        scores = [(q_sink * kr[:, :, u]).sum(-1) for u in old_sinks] + [(qr[:, :, t] * kr[:, :, u]).sum(-1) for u in recent]
        scores = mx.stack(scores, axis=-1) * d**-0.5
        weights = g * mx.exp(scores - scores.max(-1, keepdims=True))
        numerator = (weights[..., None] * v[:, :, mx.array(old_sinks + recent)]).sum(2)
        denominator = weights.sum(-1, keepdims=True)
        for u in range(t - WINDOW + 1):  # keys that left the window, decayed since they entered
            a = (fq[:, :, t] * fk[:, :, u]).sum(-1, keepdims=True) * (0.5 ** ((t - WINDOW - u) / half_life) if half_life else 1)
            numerator, denominator = numerator + a * v[:, :, u], denominator + a
        outputs.append(numerator / denominator)
    return attn.o_proj(mx.stack(outputs, axis=2).transpose(0, 2, 1, 3).reshape(B, L, -1))


@pytest.mark.parametrize("model_type,sinks", [("llama", 0), ("qwen3", 0), ("llama", 2)])
def test_follows_the_design(model_type, sinks):
    """30 tokens (the chunked scan) and 12 (the recurrent one), windows of 8."""
    attn = lolcats_model(model_type, sinks).layers[0].self_attn
    for L in (30, 12):
        x = mx.random.normal((2, L, TINY["hidden_size"]))
        assert mx.allclose(attn(x), reference_lolcats(attn, x, sinks), atol=1e-4).item()


def test_half_life():
    attn = lolcats_model(half_life=5.0).layers[0].self_attn
    x = mx.random.normal((1, 30, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_lolcats(attn, x, half_life=5.0), atol=1e-4).item()
    assert not mx.allclose(attn(x), reference_lolcats(attn, x), atol=1e-3).item()
    assert_pieces_match_one_forward(lolcats_model(half_life=5.0), ([9, 3, 1, 10],))


def test_maps_before_rope():
    """after_rope=False: the same form with phi of the unrotated q, k."""
    attn = lolcats_model(after_rope=False).layers[0].self_attn
    x = mx.random.normal((1, 30, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_lolcats(attn, x, after_rope=False), atol=1e-4).item()
    assert not mx.allclose(attn(x), reference_lolcats(attn, x), atol=1e-3).item()
    assert_pieces_match_one_forward(lolcats_model(after_rope=False), ([9, 3, 1, 10],))


def test_feature_dim():
    """feature_dim=f: maps of d x f from the identity (2f features), the same form; its state holds 2f rows."""
    d = TINY["head_dim"]
    fresh = tiny_model(method="lolcats", options={"feature_dim": d}).layers[0].self_attn.method
    assert fresh.q_map.shape == (TINY["num_attention_heads"], d, d) and mx.array_equal(fresh.q_map[0], mx.eye(d)).item()
    model = lolcats_model(feature_dim=d)
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 30, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_lolcats(attn, x), atol=1e-4).item()
    assert_pieces_match_one_forward(model, ([9, 3, 1, 10],))
    assert cache_bytes(model)[0] - cache_bytes(lolcats_model())[0] == TINY["num_hidden_layers"] * 4 * (
        TINY["num_attention_heads"] * d * (d + 1 + WINDOW))  # d more features: rows of S, z and the queue
    for wrong in (d + 1, 2.5, -1):
        with pytest.raises(ValueError, match=f"feature_dim={wrong}: give a whole number to {d}"):
            tiny_model(method="lolcats", options={"feature_dim": wrong})


def test_gradients_follow_the_design():
    attn = lolcats_model().layers[1].self_attn
    x = mx.random.normal((1, 26, TINY["hidden_size"]))

    def loss(forward, params):
        attn.method.update(params)
        return forward(attn, x).square().sum()

    params = dict(attn.method.parameters())
    grads = [mx.grad(lambda p: loss(f, p))(params) for f in (lambda a, x: a(x), reference_lolcats)]
    for name in ("q_map", "k_map", "window_logit"):
        assert mx.abs(grads[0][name]).max() > 0
        assert mx.allclose(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3).item(), name


@pytest.mark.parametrize("sinks", [0, 2])
def test_prefill_pieces_then_decode_equals_full_forward(sinks):
    assert_pieces_match_one_forward(lolcats_model("qwen3", sinks), ([5, 9, 1, 12], [9, 3, 1, 10], [20]))


def test_state_size_is_constant():
    sizes = cache_bytes(lolcats_model())
    H, d, W = TINY["num_attention_heads"], TINY["head_dim"], WINDOW
    state = H * d * (d + 1) + H * W * d + H * W * (d + 1)  # S and z, the queue of features and values
    window = 2 * W * TINY["num_key_value_heads"] * d
    assert sizes[0] == sizes[1] == TINY["num_hidden_layers"] * 4 * (state + window)


def test_parameters_and_bad_options():
    model = lolcats_model()
    names = {n for n, _ in tree_flatten(model.layers[0].self_attn.method.parameters())}
    assert names == {"q_map", "k_map", "window_logit"}
    fresh = tiny_model(method="lolcats")
    assert mx.allclose(mx.sigmoid(fresh.layers[0].self_attn.method.window_logit), mx.array(0.1)).item()
    with pytest.raises(ValueError, match="window_factor"):
        tiny_model(method="lolcats", options={"window_factor": 1.5})

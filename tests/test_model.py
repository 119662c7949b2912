"""The linearized model: its math against a hand-written reference, and its caches."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from conftest import (TINY_CONFIGS, TINY, assert_follows, assert_pieces_match_one_forward, cache_bytes,
                      incremental, mixed_output, reference_window, tiny_model)


def hgrn2_gates(k):
    """Liger-HGRN2: forget gate sigmoid(k), the key its complement (HGRN2's tied input gate)."""
    return mx.sigmoid(k), 1 - mx.sigmoid(k)


def reference_liger(attn, x, window, sinks=0, normalize=False, mix=0.5, maps=None, gate_normalizer=16, gates=None, sink_horizon=0):
    """Section 1 of the design file, token by token, with explicit GQA repetition. `gates`: k -> (gate,
    key feature) for the other gate forms (Liger-GLA's otherwise)."""
    B, L, _ = x.shape
    H, Hkv = attn.n_heads, attn.n_kv_heads
    q, k, v = attn.project(x)  # the pretrained projections (and Qwen3 norms), per head
    fq, fk = (q, k) if maps is None else (q @ maps[0], k @ maps[1])
    gate, fk = gates(k) if gates else (mx.exp(nn.log_sigmoid(k) / gate_normalizer), mx.softmax(fk, axis=-1))
    gate, fk, fq = mx.repeat(gate, H // Hkv, axis=1), mx.repeat(fk, H // Hkv, axis=1), mx.softmax(fq, axis=-1)
    v = mx.repeat(v, H // Hkv, axis=1)
    d = q.shape[-1]
    S, z = mx.zeros((B, H, d, d)), mx.zeros((B, H, d))
    outputs = []
    for t in range(L):
        S = gate[:, :, t, :, None] * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = gate[:, :, t] * z + fk[:, :, t]
        linear = (fq[:, :, t, None, :] @ S)[:, :, 0]
        if normalize:
            linear = linear / ((fq[:, :, t] * z).sum(-1, keepdims=True) + 1e-6)
        outputs.append(linear)
    return mixed_output(attn, mx.stack(outputs, axis=2), reference_window(attn, x, window, sinks, sink_horizon), mix)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sinks,sink_horizon", [(0, 0), (3, 0), (3, 20)])
def test_attention_follows_the_design(model_type, sinks, sink_horizon):
    """With a sink horizon of 20, the 30 tokens' queries read the sinks where they lie, then from 20."""
    model = tiny_model(model_type, sinks=sinks, sink_horizon=sink_horizon)
    attn = model.layers[0].self_attn
    x = mx.random.normal((2, 30, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_liger(attn, x, window=8, sinks=sinks, sink_horizon=sink_horizon), atol=1e-4).item()


@pytest.mark.parametrize("model_type,sinks", [("llama", 0), ("qwen3", 2)])
def test_hgrn2_follows_the_design(model_type, sinks):
    attn = tiny_model(model_type, sinks=sinks, method="liger-hgrn2").layers[0].self_attn
    assert_follows(attn, lambda x: reference_liger(attn, x, window=8, sinks=sinks, gates=hgrn2_gates))


@pytest.mark.parametrize("learned_mix", [False, True])
def test_normalized_and_mixed_variant(learned_mix):
    options = {"normalize": True, "mix": 0.1, "learned_mix": learned_mix}
    model = tiny_model("llama", sinks=2, options=options)
    attn = model.layers[1].self_attn
    x = mx.random.normal((1, 25, TINY["hidden_size"]))
    expected = reference_liger(attn, x, window=8, sinks=2, normalize=True, mix=0.1)
    assert mx.allclose(attn(x), expected, atol=1e-4).item()
    assert ("method.mix_logit" in dict(tree_flatten(attn.parameters()))) == learned_mix


@pytest.mark.parametrize("method,gates", [("liger-gla", None), ("liger-hgrn2", hgrn2_gates)])
def test_learned_mix_weighs_each_head(method, gates):
    attn = tiny_model("qwen3", sinks=2, method=method, options={"mix": 0.2, "learned_mix": True}).layers[1].self_attn
    attn.method.mix_logit = mx.random.normal((TINY["num_attention_heads"], 1, 1))  # as if trained
    mix = 1 / (1 + mx.exp(-attn.method.mix_logit))
    assert_follows(attn, lambda x: reference_liger(attn, x, window=8, sinks=2, mix=mix, gates=gates))


def test_gate_normalizer():
    model = tiny_model("llama", sinks=1, options={"gate_normalizer": 256, "normalize": True})
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 30, TINY["hidden_size"]))
    expected = reference_liger(attn, x, window=8, sinks=1, normalize=True, gate_normalizer=256)
    assert mx.allclose(attn(x), expected, atol=1e-4).item()
    assert not mx.allclose(attn(x), reference_liger(attn, x, window=8, sinks=1, normalize=True), atol=1e-3).item()


def test_feature_projections():
    model = tiny_model("llama", options={"feature_proj": True})
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 20, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_liger(attn, x, window=8), atol=1e-4).item()  # identity at first
    attn.method.q_map = attn.method.q_map + 0.3 * mx.random.normal(attn.method.q_map.shape)
    attn.method.k_map = attn.method.k_map + 0.3 * mx.random.normal(attn.method.k_map.shape)
    maps = (attn.method.q_map, attn.method.k_map)
    assert mx.allclose(attn(x), reference_liger(attn, x, window=8, maps=maps), atol=1e-4).item()


def reference_supra(attn, x):
    """Section 2 of the design file in its quadratic form: sum over s <= t of
    gamma_h^(t-s) (phi(q_t) . phi(k_s)) v_s per query head, then a per-head GroupNorm."""
    B, L, _ = x.shape
    H, Hkv = attn.n_heads, attn.n_kv_heads
    method = attn.method
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    relu = lambda dense, t: mx.maximum(t @ dense.weight.T + dense.bias, 0)  # noqa: E731
    fq = relu(method.q_feature, q).reshape(B, L, H, -1).transpose(0, 2, 1, 3)
    fk = relu(method.k_feature, k).reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
    d = fq.shape[-1]
    fq, fk = attn.rope(fq), mx.repeat(attn.rope(fk), H // Hkv, axis=1) / d**0.5
    values = mx.repeat(v.reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3), H // Hkv, axis=1)
    s = 2.0 ** (-mx.arange(1, H + 1) * 8 / H)
    t = mx.arange(L)
    lags = (t[:, None] - t[None, :]).astype(mx.float32)
    decay = mx.where(lags >= 0, mx.exp(-s[:, None, None] * mx.maximum(lags, 0)), 0)  # (H, L, L)
    o = ((fq @ fk.swapaxes(-1, -2)) * decay) @ values
    mean, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
    linear = (o - mean) / mx.sqrt(var + 1e-5)
    return attn.o_proj(linear.transpose(0, 2, 1, 3).reshape(B, L, -1))


@pytest.mark.parametrize("trained", [False, True])
def test_supra_follows_the_design(trained):
    model = tiny_model("llama", method="supra")
    attn = model.layers[0].self_attn
    assert set(dict(tree_flatten(attn.method.parameters()))) == {f"{m}_feature.{p}" for m in "qk" for p in ("weight", "bias")}
    if trained:  # away from the identity start, so a misplaced map or bias shows
        for dense in (attn.method.q_feature, attn.method.k_feature):
            dense.weight = dense.weight + 0.2 * mx.random.normal(dense.weight.shape)
            dense.bias = 0.1 * mx.random.normal(dense.bias.shape)
    x = mx.random.normal((2, 30, TINY["hidden_size"]))
    assert mx.allclose(attn(x), reference_supra(attn, x), atol=1e-4).item()


SUPRA_MIXED = {"method": "supra", "options": {"mix": 0.5}}


@pytest.mark.parametrize("model_type,full_attention_every,sinks,method", [
    ("llama", 0, 0, {}), ("qwen3", 0, 0, {}), ("llama", 2, 0, {}), ("llama", 0, 2, {}), ("qwen3", 2, 4, {}),
    ("llama", 0, 0, {"method": "supra"}), ("qwen3", 2, 2, SUPRA_MIXED),
    ("qwen3", 2, 2, {"method": "liger-hgrn2"}), ("llama", 0, 2, {"method": "liger-gsa"}),
    ("qwen3", 2, 0, {"method": "liger-gsa", "options": {"slots": 6}}),
    ("llama", 0, 2, {"sink_horizon": 25}), ("qwen3", 0, 3, {"method": "lolcats", "sink_horizon": 30}),
])
def test_prefill_pieces_then_decode_equals_full_forward(model_type, full_attention_every, sinks, method):
    """Window 8: pieces of 5, 9 and 1 then decode cross the window boundary several times (and a
    sink horizon: decode steps read the sinks where they lie, then from it)."""
    model = tiny_model(model_type, full_attention_every=full_attention_every, sinks=sinks, **method)
    assert_pieces_match_one_forward(model, ([5, 9, 1, 12], [9, 3, 1, 10]))  # a piece starting in the window, past it


@pytest.mark.parametrize("method,memories", [("liger-gla", 1), ("liger-hgrn2", 1), ("liger-gsa", 2)])
def test_cache_bytes_do_not_grow(method, memories):
    """Per layer: `memories` d x d float32 states per KV head (GSA: keys into slots, slots into
    values), and the window's keys and values."""
    sizes = cache_bytes(tiny_model(method=method))
    Hkv, d = TINY["num_key_value_heads"], TINY["head_dim"]
    assert sizes[0] == sizes[1] == TINY["num_hidden_layers"] * 4 * Hkv * (memories * d * d + 2 * 8 * d)


def test_liger_h_keeps_softmax_layers():
    model = tiny_model(full_attention_every=2)
    assert type(model.layers[1].self_attn).__name__ == "Attention"
    assert type(model.layers[0].self_attn).__name__ == "LinearizedAttention"


def test_softmax_mode_is_the_original_transformer():
    from mlx_linear.model import base_architecture
    from mlx.utils import tree_flatten

    model = tiny_model()
    arch = base_architecture("llama")
    config = {"model_type": "llama", **TINY, **TINY_CONFIGS["llama"]}
    original = arch.Model(arch.ModelArgs.from_dict(config))
    original.load_weights(tree_flatten(model.parameters()))
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 20))
    model.use_softmax_attention(True)
    assert mx.allclose(model(tokens), original(tokens), atol=1e-5).item()
    model.use_softmax_attention(False)
    assert not mx.allclose(model(tokens), original(tokens), atol=1e-2).item()


@pytest.mark.parametrize("method", [{}, {"method": "lolcats"}, {"method": "lola", "options": {"slots": 4}}, {"method": "liger-gsa"}])
def test_prompt_cache_file_round_trip(tmp_path, method):
    model = tiny_model(**method)
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 30))
    _, cache = incremental(model, tokens, [29])
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    nxt = mx.array([[7]])
    assert mx.allclose(model(nxt, cache=cache), model(nxt, cache=loaded), atol=1e-6).item()


@pytest.mark.parametrize("sinks,method", [(0, {}), (2, {}), (2, {"method": "lolcats"}), (2, {"method": "lola"}), (2, SUPRA_MIXED),
                                         (2, {"method": "liger-hgrn2"}), (0, {"method": "liger-gsa"}),
                                         (2, {"sink_horizon": 60}), (2, {"method": "lola", "sink_horizon": 60})])
def test_window_branch_ignores_the_absolute_position(sinks, method):
    """State off, every layer reads only its sinks and its window, so the last logits depend on
    the sinks' tokens and the last (layers x window) tokens, not on how far back the sinks are:
    a query never sits further from the sinks than it did at the sink horizon (by default
    window + sinks - 1). Before a horizon of 60 they are read where they lie: the logits differ."""
    model = tiny_model(sinks=sinks, **method)
    model.use_state(False)
    head, tail = mx.random.randint(0, TINY["vocab_size"], (1, sinks)), mx.random.randint(0, TINY["vocab_size"], (1, 20))
    if method.get("sink_horizon"):
        nearer = model(mx.concatenate([head, mx.random.randint(0, TINY["vocab_size"], (1, 10)), tail], axis=1))[:, -1]
    last = []
    for filler in (60, 3000):
        middle = mx.random.randint(0, TINY["vocab_size"], (1, filler))
        _, cache = incremental(model, mx.concatenate([head, middle, tail[:, :-1]], axis=1), [filler + sinks + 18])
        last.append(model(tail[:, -1:], cache=cache))
    assert mx.allclose(last[0], last[1], atol=1e-4).item()
    if method.get("sink_horizon"):
        assert not mx.allclose(nearer, last[0][:, -1], atol=1e-3).item()
    model.use_state(True)
    with_state = incremental(model, mx.concatenate([head, tail], axis=1), [sinks + 19])[0][:, -1]
    assert not mx.allclose(with_state, last[0][:, -1], atol=1e-3).item()  # the switch switches something

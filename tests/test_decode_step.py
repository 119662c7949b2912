"""The compiled decode step (decode.py) against the plain path, and 4-bit models dequantized at load."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import mlx_linear
from conftest import TINY, cpu_only, incremental, tiny_model
from mlx_linear import decode
from mlx_linear.convert import convert

CHAT = {"sinks": 2, "options": {"normalize": True, "mix": 0.1, "learned_mix": True, "feature_proj": True}}
RECIPES = {
    "liger-gla": {},
    "liger-gla chat recipe": CHAT,
    "lolcats": {"method": "lolcats"},
    "lolcats sinks": {"method": "lolcats", "sinks": 2},
    "lolcats before rope": {"method": "lolcats", "options": {"after_rope": False}},
    "lolcats chat recipe": {"method": "lolcats", "sinks": 2, "options": {"after_rope": False, "half_life": 256}},
    "lolcats wider maps": {"method": "lolcats", "sinks": 2, "options": {"after_rope": False, "half_life": 256, "feature_dim": 16}},
    "lola sinks": {"method": "lola", "sinks": 2, "options": {"slots": 3}},
    "lola sinks where they lie": {"method": "lola", "sinks": 2, "sink_horizon": 20, "options": {"slots": 3, "sinks_in_state": False}},
    "liger-gla sinks where they lie": {**CHAT, "sink_horizon": 20},
    "supra": {"method": "supra"},
    "supra sinks": {"method": "supra", "sinks": 3},
    "liger-hgrn2": {"method": "liger-hgrn2"},
    "liger-gsa sinks": {"method": "liger-gsa", "sinks": 2},
}
TOKENS = mx.random.randint(0, TINY["vocab_size"], (1, 40), key=mx.random.key(3))
EXACT = {"rtol": 1e-6, "atol": 1e-6}  # float32 rounding: compilation may fuse elementwise ops


def decode_both_ways(model, prompt=12, tokens=TOKENS):
    """(logits, cache) of a prefill of `prompt` tokens and single-token decode after it: the
    plain path first, then the compiled one."""
    runs = []
    for compiled in (False, True):
        model.compile_decode = compiled
        runs.append(incremental(model, tokens, [prompt]))
    return runs


def assert_caches_equal(a, b):
    for x, y in zip(a, b):
        window_x, window_y = x.caches[1], y.caches[1]
        assert (window_x.offset, window_x._idx) == (window_y.offset, window_y._idx)
    flat_a, flat_b = tree_flatten([c.state for c in a]), tree_flatten([c.state for c in b])
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        assert mx.allclose(x, y, **EXACT).item() if isinstance(x, mx.array) else x == y


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_decode_equals_plain_path(arch, recipe):
    model = tiny_model(arch, **RECIPES[recipe])
    (plain, plain_cache), (compiled, compiled_cache) = decode_both_ways(model)
    assert model._decode_steps  # the compiled step ran once the window was full
    assert mx.allclose(plain, compiled, **EXACT).item()
    assert_caches_equal(plain_cache, compiled_cache)


def test_compiled_step_is_taken_only_once_the_window_is_full(monkeypatch):
    model = tiny_model(**CHAT)  # window 8 + 2 sinks
    taken, stock = [], decode.decode

    def counted(*args):
        taken.append(args[1].shape)
        return stock(*args)

    monkeypatch.setattr(decode, "decode", counted)
    incremental(model, TOKENS[:, :20], [4])
    assert len(taken) == 20 - 10  # the steps from position 10 on: the buffer holds sinks and window


def test_compiled_step_sees_changed_weights():
    """Weights are inputs of the compiled step, not constants baked into it at tracing."""
    model = tiny_model(**CHAT)
    decode_both_ways(model)
    for layer in model.layers:
        layer.self_attn.o_proj.weight = 2 * layer.self_attn.o_proj.weight
        layer.self_attn.method.mix_logit = layer.self_attn.method.mix_logit + 1
    (plain, _), (compiled, _) = decode_both_ways(model)
    assert mx.allclose(plain, compiled, **EXACT).item()


def test_the_window_branch_alone_after_a_compiled_decode():
    """use_state(False) (eval's "what the state adds") is read when the step is traced: turned
    off mid-conversation, decoding must not go on with a step traced with the state on."""
    model = tiny_model(**CHAT)
    outputs = []
    for compiled in (False, True):
        model.compile_decode = compiled
        model.use_state(True)
        _, cache = incremental(model, TOKENS[:, :25], [12])
        model.use_state(False)
        outputs.append(mx.concatenate([model(TOKENS[:, t : t + 1], cache=cache) for t in range(25, 40)], axis=1))
    assert mx.allclose(*outputs, **EXACT).item()


def test_compiled_decode_after_a_saved_and_loaded_cache(tmp_path):
    """A state file (the chat's /save, /load) continues on the compiled step as on the plain one."""
    model = tiny_model(**CHAT)
    model.compile_decode = False
    _, cache = incremental(model, TOKENS[:, :25], [20])
    save_prompt_cache(str(tmp_path / "s.safetensors"), cache)
    outputs = []
    for compiled in (False, True):
        model.compile_decode = compiled
        loaded = load_prompt_cache(str(tmp_path / "s.safetensors"))
        outputs.append(mx.concatenate([model(TOKENS[:, t : t + 1], cache=loaded) for t in range(25, 40)], axis=1))
    assert mx.allclose(*outputs, **EXACT).item()


def test_long_decode_wraps_the_ring_buffer():
    """Many turns of the ring buffer past the sinks: the write slot follows mlx-lm's."""
    model = tiny_model(**CHAT)
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 60), key=mx.random.key(4))
    (plain, plain_cache), (compiled, compiled_cache) = decode_both_ways(model, prompt=3, tokens=tokens)
    assert mx.allclose(plain, compiled, **EXACT).item()
    assert_caches_equal(plain_cache, compiled_cache)


def test_liger_h_takes_the_plain_path():
    model = tiny_model(full_attention_every=2)
    incremental(model, TOKENS, [12])
    assert not model._decode_steps


@pytest.fixture(scope="module")
def quantized(hf_checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("q") / "m"
    return convert(folder, hf_source=str(hf_checkpoints["qwen2"]), window=8, quantize=True, q_bits=4,
                   q_group_size=32, log=lambda m: None)


@cpu_only
def test_4bit_dequantized_at_load_on_the_cpu(quantized):
    kept, _ = mlx_linear.load(quantized, dequantize=False)
    auto, _ = mlx_linear.load(quantized)  # the CPU: float32, dequantized
    assert type(kept.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in auto.named_modules())
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(auto.parameters()))
    tokens = TOKENS[:, :20]
    assert mx.allclose(kept(tokens), auto(tokens), atol=1e-4).item()
    (plain, _), (compiled, _) = decode_both_ways(auto)
    assert mx.allclose(plain, compiled, **EXACT).item()


@cpu_only
def test_generate_keeps_a_quantized_model_quantized_when_asked(quantized, monkeypatch):
    from click.testing import CliRunner

    from mlx_linear.chat import model as chat_model
    from mlx_linear.cli import cli

    seen, stock = [], chat_model.load

    def load(*args, **kwargs):
        model, tokenizer = stock(*args, **kwargs)
        seen.append(any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()))
        return model, tokenizer

    monkeypatch.setattr(chat_model, "load", load)
    for flags in ([], ["--keep-quantized"]):
        result = CliRunner().invoke(cli, ["generate", "--model", str(quantized), "--raw", "--prompt", "the", "--max-tokens", "12", *flags])
        assert result.exit_code == 0, result.output
    assert seen == [False, True]

"""The decode step's fused kernels (mlx_linear/step_kernels.py), executed on the CPU from their
Metal source (tests/metal_emulation), against the MLX-ops step they replace, the oracle: the
logits and every array of the new cache after one decode step of a tiny model."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from metal_emulation import compiler, metal_kernel

from mlx_linear import decode, step_kernels

from conftest import TINY, incremental, tiny_model

CHAT = {"sinks": 2, "options": {"normalize": True, "mix": 0.1, "learned_mix": True, "feature_proj": True}}
# Head dims past a simdgroup's 32 lanes (SmolLM2's and Llama-3.2-1B's 64), RoPE's pairs side by side.
WIDE = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "rope_traditional": True}
LOLA = {"method": "lola", "sinks": 2, "options": {"slots": 3}}
LOLA_CHAT = {"method": "lola", "sinks": 2, "options": {"slots": 3, "half_life": 6.0, "after_rope": False}}
# The sinks read where they lie up to position 30 (a rotation a step), kept out of the state.
LOLA_SINKS = {**LOLA_CHAT, "sink_horizon": 30, "options": {**LOLA_CHAT["options"], "sinks_in_state": False}}


@pytest.fixture
def fused(monkeypatch):
    """use(True): the step takes the kernels, run by the emulator; use(False): MLX's ops."""
    if compiler() is None:
        pytest.skip("the Metal emulation needs Linux and clang++ (apt-get install clang)")

    def use(on, schedules=(0,)):
        kernels = step_kernels.make_step_kernels(lambda **spec: metal_kernel(**spec, schedules=schedules)) if on else None
        monkeypatch.setattr(step_kernels, "ready", lambda name: kernels[name] if kernels else None)
    return use


def one_step(model, prompt=13, batch=1, seed=0):
    """(logits, per-layer (state, keys, values)) of one uncompiled decode step after `prompt` tokens."""
    tokens = mx.random.randint(0, TINY["vocab_size"], (batch, prompt + 1), key=mx.random.key(seed))
    _, cache = incremental(model, tokens[:, :prompt], [prompt])
    window = cache[0].caches[1]
    offset, slot = mx.array(window.offset), mx.array(decode.write_slot(window))
    kind = decode.step_kind(model, window.offset)
    logits, arrays = decode.run_step(model, tokens[:, prompt:], offset, slot, decode.flat_arrays(cache), kind)
    mx.eval(logits, arrays)
    return logits, arrays


def assert_same_step(model, fused, **options):
    fused(True)
    got = one_step(model, **options)
    fused(False)
    expected = one_step(model, **options)
    assert mx.allclose(got[0], expected[0], rtol=1e-5, atol=1e-5).item()
    for layer, (mine, theirs) in enumerate(zip(got[1], expected[1])):
        for x, y in zip(tree_flatten(mine), tree_flatten(theirs)):
            assert x[1].shape == y[1].shape and mx.allclose(x[1], y[1], rtol=1e-5, atol=1e-5).item(), (layer, x[0])


@pytest.mark.parametrize("arch,recipe,batch", [("llama", {}, 1), ("qwen3", CHAT, 2), ("llama", {"sinks": 3}, 2),
                                                ("llama", {"shape": WIDE, **CHAT}, 1), ("qwen3", {**CHAT, "sink_horizon": 30}, 2)])
def test_liger_step_kernel_equals_the_ops_step(fused, arch, recipe, batch):
    assert_same_step(tiny_model(arch, **recipe), fused, batch=batch)


@pytest.mark.parametrize("recipe,prompt,batch", [(LOLA, 13, 1), (LOLA_CHAT, 21, 2), (LOLA_CHAT, 24, 1),
                                                 ({"shape": WIDE, **LOLA_CHAT}, 29, 1), (LOLA_SINKS, 21, 2), (LOLA_SINKS, 40, 1)])
def test_lola_step_kernel_equals_the_ops_step(fused, recipe, prompt, batch):
    """Between boundaries and at one (24: the block's shift, then the kernel), the cache partly
    filled, GQA groups of 2 and 4, head dims of 16 and 64."""
    assert_same_step(tiny_model(**recipe), fused, prompt=prompt, batch=batch)


@pytest.mark.parametrize("recipe,prompt", [(CHAT, 13), (LOLA_CHAT, 21)])
def test_step_kernels_do_not_depend_on_the_simdgroup_order(fused, recipe, prompt):
    fused(True, schedules=(0, 1))  # KernelError where the two orders differ (a missing barrier)
    one_step(tiny_model("qwen3", **recipe), prompt=prompt, batch=2)


@pytest.mark.parametrize("recipe,kernel", [({}, "liger"), (LOLA, "lola")])
def test_the_step_takes_the_kernel(fused, monkeypatch, recipe, kernel):
    calls = []
    fused(True)
    stock = step_kernels.ready
    monkeypatch.setattr(step_kernels, "ready", lambda name: calls.append(name) or stock(name))
    one_step(tiny_model(**recipe))
    assert calls.count(kernel) == TINY["num_hidden_layers"]  # the prefill asks for LoLA's boundary kernel too


ON_GPU = mx.metal.is_available() or step_kernels.cuda_available()


@pytest.mark.skipif(not ON_GPU, reason="runs MLX's own kernels (Metal, or the CUDA twins) on a GPU")
@pytest.mark.parametrize("recipe,prompt", [(CHAT, 13), ({"shape": WIDE, **LOLA_CHAT}, 29), (LOLA_CHAT, 24)])
def test_step_kernels_on_this_gpu(monkeypatch, recipe, prompt):
    """The kernels MLX builds here (the CUDA twins asked for) against the ops step, compiled."""
    monkeypatch.setenv("MLX_LINEAR_KERNELS", "cuda")
    assert step_kernels._kernels is not None
    model = tiny_model(**recipe)
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, prompt + 8), key=mx.random.key(5))
    runs = []
    for kernels in ("cuda", "0"):
        monkeypatch.setenv("MLX_LINEAR_KERNELS", kernels)
        model._decode_steps = {}
        runs.append(incremental(model, tokens, [prompt]))
    assert mx.allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-4).item()


def prefill(model, tokens):
    """Logits and every layer's state after one forward of `tokens` through a fresh cache."""
    _, cache = incremental(model, tokens, [tokens.shape[1]])
    logits = model(tokens[:, -1:], cache=cache)  # the step after, which reads the last boundary's cache
    mx.eval(logits, [c.state for c in cache])
    return logits, [c.state for c in cache]


HORIZON = {**LOLA_CHAT, "options": {**LOLA_CHAT["options"], "horizon": 12}}
UNIQUE = {**LOLA_CHAT, "options": {**LOLA_CHAT["options"], "slots": 6, "horizon": 0, "cache_unique": 0.5}}  # copies by chance
LONG = {**LOLA_CHAT, "options": {**UNIQUE["options"], "horizon": 12, "long_slots": 2}}


@pytest.mark.parametrize("recipe,length", [(LOLA, 40), (LOLA_CHAT, 45), (HORIZON, 60),
                                           ({**LOLA, "options": {"slots": 12, "horizon": 12}}, 48), ({"shape": WIDE, **LOLA_CHAT}, 37),
                                           (UNIQUE, 50), ({"shape": WIDE, **UNIQUE}, 45), (LONG, 60), (LOLA_SINKS, 45)])
def test_lola_boundary_kernel_equals_the_ops(fused, recipe, length):
    """A prefill crossing several block boundaries: the cache filling, full, past a horizon (fewer
    eligible keys than slots: the cache's keys past it stay in their slots as zeros and enter the state)."""
    model = tiny_model(**recipe)
    model.compile_decode = False
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, length), key=mx.random.key(7))
    fused(True)
    got = prefill(model, tokens)
    fused(False)
    expected = prefill(model, tokens)
    assert mx.allclose(got[0], expected[0], rtol=1e-5, atol=1e-5).item()
    arrays = [[(k, x) for k, x in tree_flatten(states) if isinstance(x, mx.array)] for states in (got[1], expected[1])]
    assert len(arrays[0]) == len(arrays[1]) > 0
    for (name, x), (_, y) in zip(*arrays):
        assert mx.allclose(x, y, rtol=1e-5, atol=1e-5).item(), name


def test_lola_boundary_kernel_trains_with_the_ops_gradients(fused):
    model = tiny_model(**LOLA_CHAT)
    x = mx.random.normal((1, 30, TINY["hidden_size"]), key=mx.random.key(8))
    attention = model.layers[0].self_attn
    grads = []
    for on in (True, False):
        fused(on)
        grads.append(mx.grad(lambda x: attention(x).square().sum())(x))
    assert mx.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4).item()

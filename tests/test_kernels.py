"""The Metal kernels, executed on the CPU from their exact source (tests/metal_emulation), against
the pure-MLX oracle gla_recurrent: forward and gradients, through the gla_scan dispatcher."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from metal_emulation import KernelError, compiler, metal_kernel

from mlx_linear import kernels
from mlx_linear.scan import gla_recurrent, gla_scan

from conftest import make_inputs, tiny_model

# One schedule for the bulk of the cases; the race tests run two and compare them.
EMULATED = kernels.make_kernels(lambda **spec: metal_kernel(**spec, schedules=(0,)))
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
CASES = [(B, T, d, dtype) for B in (1, 2) for T in (1, 7, 64, 129) for d in (32, 64, 128) for dtype in DTYPES]


@pytest.fixture
def emulated(monkeypatch):
    """gla_scan as on an Apple GPU, with the Metal kernels run by the emulator."""
    if compiler() is None:
        pytest.skip("the Metal emulation needs Linux and clang++ (apt-get install clang)")
    monkeypatch.delenv("MLX_LINEAR_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_kernels", EMULATED)
    monkeypatch.setattr(kernels, "_metal_ready", lambda: True)
    assert kernels.scan_kernel() is kernels.gla_metal


def case(B, T, d, dtype=mx.float32, seed=0):
    H, Hs = (6, 2) if B == 1 else (2, 1)  # GQA groups of 3 and of 2 query heads
    q, k, v, log_g, state = make_inputs(B, H, Hs, T, d, seed=seed + T + d)
    return [x.astype(dtype) for x in (q, k, v, log_g)] + [state]


def vjp(scan, inputs, seed=1):
    """(outputs, gradients of a random linear function of both outputs for all five inputs)."""
    q, _, v, _, state = inputs
    mx.random.seed(seed)
    cotangents = [mx.random.normal(q.shape[:-1] + v.shape[-1:]), mx.random.normal(state.shape)]
    return mx.vjp(scan, list(inputs), cotangents)


def max_error(x, reference):
    x, reference = x.astype(mx.float32), reference.astype(mx.float32)
    return (mx.abs(x - reference).max() / mx.maximum(mx.abs(reference).max(), 1.0)).item()


def assert_matches(inputs, output_tolerance=1e-5, gradient_tolerance=1e-5):
    (o, state), grads = vjp(gla_scan, inputs)
    (o_ref, state_ref), grads_ref = vjp(gla_recurrent, inputs)
    for x, x_ref in ((o, o_ref), (state, state_ref)):
        assert x.dtype == mx.float32 and x.shape == x_ref.shape
        assert max_error(x, x_ref) < output_tolerance
    for name, g, g_ref in zip("q k v log_g state".split(), grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert max_error(g, g_ref) < gradient_tolerance, name


@pytest.mark.parametrize("B,T,d,dtype", CASES)
def test_kernels_match_the_oracle(emulated, B, T, d, dtype):
    # Gradients come back in the input dtype: compare to within its rounding.
    assert_matches(case(B, T, d, dtype), gradient_tolerance=1e-5 if dtype == mx.float32 else 1e-2)


def test_odd_head_dims_and_one_gate_per_head(emulated):
    """dv = 65 (Liger's normalize option), dk = 16 (zero-padded to 32), scalar decay per head."""
    q, k, v, log_g, state = make_inputs(1, 4, 2, 9, 16, seed=4)
    v = mx.concatenate([v, mx.random.normal((1, 2, 9, 49))], axis=-1)
    assert_matches((q, k, v, log_g[..., :1], mx.random.normal((1, 2, 16, 65))))


@pytest.mark.parametrize("method", ["liger-gla", "liger-hgrn2", "liger-gsa"])
def test_model_with_kernels_equals_model_without(emulated, monkeypatch, method):
    """Prefill, decode and a training gradient of a tiny Liger model (head dim 16); GSA's second pass
    runs the kernels, its slot pass MLX ops."""
    model = tiny_model("llama", method=method)
    model.compile_decode = False  # the emulator evaluates in numpy, which a traced step cannot
    tokens = mx.random.randint(0, 128, (1, 12), key=mx.random.key(3))

    def run():
        cache = model.make_cache()
        logits = [model(tokens[:, :10], cache=cache)[:, -1]]
        logits += [model(tokens[:, t : t + 1], cache=cache)[:, -1] for t in (10, 11)]
        loss = lambda x, y: nn.losses.cross_entropy(model(x), y).mean()  # noqa: E731
        return logits, nn.value_and_grad(model, loss)(tokens[:, :-1], tokens[:, 1:])[1]

    with_kernels = run()
    monkeypatch.setenv("MLX_LINEAR_KERNELS", "0")
    assert kernels.scan_kernel() is None
    without = run()
    for a, b in zip(with_kernels[0], without[0]):
        assert max_error(a, b) < 1e-4
    flat = dict(tree_flatten(with_kernels[1]))
    for name, g in tree_flatten(without[1]):
        assert max_error(flat[name], g) < 1e-4, name


def test_no_kernel_without_metal_or_when_turned_off(monkeypatch):
    monkeypatch.setattr(kernels, "_kernels", None)
    assert kernels.scan_kernel() is None
    monkeypatch.setattr(kernels, "_kernels", EMULATED)
    monkeypatch.setattr(kernels, "_metal_ready", lambda: True)
    monkeypatch.setenv("MLX_LINEAR_KERNELS", "0")
    assert kernels.scan_kernel() is None
    assert kernels.make_kernels() is None or mx.metal.is_available()


@pytest.mark.skipif(not mx.metal.is_available(), reason="runs the kernels on an Apple GPU")
@pytest.mark.parametrize("B,T,d,dtype", [(1, 1, 64, mx.float16), (2, 129, 128, mx.bfloat16), (1, 300, 64, mx.float32)])
def test_kernels_on_an_apple_gpu(monkeypatch, B, T, d, dtype):
    monkeypatch.delenv("MLX_LINEAR_KERNELS", raising=False)
    with mx.stream(mx.gpu):
        assert kernels.scan_kernel() is kernels.gla_metal
        assert_matches(case(B, T, d, dtype), gradient_tolerance=1e-4 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("B,T,d,dtype", [(1, 64, 64, mx.float32), (2, 7, 128, mx.bfloat16)])
def test_kernels_do_not_depend_on_the_simdgroup_order(emulated, monkeypatch, B, T, d, dtype):
    monkeypatch.setattr(kernels, "_kernels", kernels.make_kernels(metal_kernel))  # both schedules
    assert_matches(case(B, T, d, dtype, seed=5), gradient_tolerance=1e-2)  # KernelError on a difference


# The harness itself: it must catch what a GPU would get wrong.


def mutated(kind, old, new, **options):
    spec = dict(kernels.SPECS[kind])
    assert spec["source"].count(old) == 1, old
    spec["source"] = spec["source"].replace(old, new)
    return metal_kernel(**spec, **options)


def test_harness_catches_a_mutated_index(emulated, monkeypatch):
    # GQA: every query head reads state head n as if there were one query head per state.
    bug = mutated("forward", "size_t(n) * R * T * Dk + lane", "size_t(n) * T * Dk + lane")
    monkeypatch.setattr(kernels, "_kernels", dict(EMULATED, forward=bug))
    inputs = case(1, 7, 32)
    o, state = gla_scan(*inputs)
    o_ref, state_ref = gla_recurrent(*inputs)
    assert max_error(state, state_ref) < 1e-5  # the state does not read q
    assert max_error(o, o_ref) > 1e-2


def test_harness_catches_a_missing_barrier(emulated, monkeypatch):
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    inputs = case(1, 7, 64)
    grads_ref = vjp(gla_recurrent, inputs)[1]
    # One schedule: a simdgroup runs ahead and reads rows the others have not written yet.
    monkeypatch.setattr(kernels, "_kernels", dict(EMULATED, backward=mutated("backward", barrier, "", schedules=(0,))))
    grads = vjp(gla_scan, inputs)[1]
    errors = {name: max_error(g, g_ref) for name, g, g_ref in zip("q k v log_g state".split(), grads, grads_ref)}
    assert errors["v"] > 1e-2  # dv is summed over rows in threadgroup memory
    assert max(errors[name] for name in ("q", "k", "log_g", "state")) < 1e-5
    # Two schedules: the results differ, which is reported as a race.
    monkeypatch.setattr(kernels, "_kernels", dict(EMULATED, backward=mutated("backward", barrier, "")))
    with pytest.raises(KernelError, match="dv_blocks` depends on the order simdgroups run in"):
        mx.eval(vjp(gla_scan, inputs))


def test_harness_reports_writes_outside_a_buffer(emulated, monkeypatch):
    bug = mutated("forward", "o_[(r * T + t) * Dv] = out;", "o_[(r * T + t + 1) * Dv] = out;")
    monkeypatch.setattr(kernels, "_kernels", dict(EMULATED, forward=bug))
    with pytest.raises(KernelError, match="wrote outside `o`"):
        mx.eval(gla_scan(*case(1, 7, 32)))


def test_harness_runs_the_metal_subset(emulated):
    """simd reductions and shuffles, small and 0-d inputs, _shape, typename templates, bfloat16
    stores, and a last threadgroup clipped to the grid, against numpy."""
    kernel = metal_kernel(
        name="subset",
        input_names=["x", "scale", "offset"],
        output_names=["out", "rounded"],
        source="""
        uint i = thread_position_in_grid.x;
        float v = x[i] * scale[1] + offset;
        out[i * 6 + 0] = simd_sum(v);
        out[i * 6 + 1] = simd_max(v);
        out[i * 6 + 2] = simd_min(v);
        out[i * 6 + 3] = simd_shuffle_xor(v, 1);
        out[i * 6 + 4] = simd_shuffle_down(v, 3);
        out[i * 6 + 5] = simd_broadcast(v, 5) + x_shape[0] + threads_per_threadgroup.x;
        rounded[i] = static_cast<T>(v);""",
    )
    x = mx.random.normal((96,), key=mx.random.key(0))
    out, rounded = kernel(
        inputs=[x, mx.array([0.0, 3.0]), 0.5], template=[("T", mx.bfloat16)], output_shapes=[(96, 6), (96,)],
        output_dtypes=[mx.float32, mx.bfloat16], grid=(96, 1, 1), threadgroup=(64, 1, 1))
    v = np.array(x * 3.0 + 0.5).reshape(3, 32)
    lane = np.arange(32)
    group_size = np.array([64, 64, 32])[:, None]  # the last threadgroup is clipped to the grid
    expected = np.stack([
        np.broadcast_to(v.sum(1, keepdims=True), v.shape), np.broadcast_to(v.max(1, keepdims=True), v.shape),
        np.broadcast_to(v.min(1, keepdims=True), v.shape), v[:, lane ^ 1],
        np.where(lane + 3 < 32, v[:, np.minimum(lane + 3, 31)], v),
        np.broadcast_to(v[:, 5:6] + 96 + group_size, v.shape),
    ], axis=-1).reshape(96, 6)
    assert np.allclose(np.array(out), expected, rtol=1e-6, atol=1e-5)
    assert mx.array_equal(rounded, (x * 3.0 + 0.5).astype(mx.bfloat16)).item()


def test_harness_reports_a_deadlock(emulated):
    kernel = metal_kernel(
        name="divergent_barrier",
        input_names=["x"],
        output_names=["y"],
        source="""
        uint i = thread_position_in_grid.x;
        if (i % 2 == 0) {
          y[i] = simd_sum(x[i]);
        } else {
          threadgroup_barrier(mem_flags::mem_threadgroup);
          y[i] = x[i];
        }""",
    )
    with pytest.raises(KernelError, match="deadlock"):
        kernel(inputs=[mx.zeros(64)], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
               threadgroup=(32, 1, 1))


def launch_arguments(monkeypatch):
    """What `_forward` and `_backward` pass to each kernel, by kernel name, for one small input."""
    recorded = {}

    def recorder(name, **_):
        def call(**kwargs):
            recorded[name] = kwargs
            return [mx.zeros(shape, dtype) for shape, dtype in zip(kwargs["output_shapes"], kwargs["output_dtypes"])]

        return call

    monkeypatch.setattr(kernels, "_kernels", kernels.make_kernels(recorder))
    q, k, v, log_g, state = case(1, 7, 64, mx.bfloat16)
    o, s = kernels._forward(q, k, v, log_g, state)
    kernels._backward(q, k, v, log_g, state, o, s)
    return recorded


@pytest.mark.parametrize("kind", sorted(kernels.SPECS))
def test_signature_is_the_one_mlx_generates(kind, capfd, tmp_path, monkeypatch):
    """MLX writes the source even without Metal while exporting a function: compare it with ours."""
    kwargs = launch_arguments(monkeypatch)[kernels.SPECS[kind]["name"]]
    real = mx.fast.metal_kernel(**kernels.SPECS[kind])
    arrays = [x for x in kwargs["inputs"] if isinstance(x, mx.array)]

    def traced(*arrays):
        it = iter(arrays)
        inputs = [next(it) if isinstance(x, mx.array) else x for x in kwargs["inputs"]]
        return real(**dict(kwargs, inputs=inputs), verbose=True)

    try:
        mx.export_function(str(tmp_path / "kernel.mlxfn"), traced, *arrays)
    except (RuntimeError, ValueError) as error:
        pytest.skip(f"this MLX cannot trace a Metal kernel without Metal: {error}")
    printed = capfd.readouterr().out
    mlx_source = printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]
    inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in kwargs["inputs"]]
    ours = EMULATED[kind].kernel_source(inputs, kwargs["output_dtypes"], kwargs["template"])
    assert ours == mlx_source

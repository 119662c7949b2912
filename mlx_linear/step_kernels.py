"""Fused kernels of the decode step and of LoLA's prefill: a linearized layer's attention for one
token in one launch (the state, the window and its sinks, the mix), where MLX's ops take ~20
kernels a layer; LoLA's block boundary (the cache's ranking and the state's write) in one.

In mlx-lm's shape, as kernels.py: `make_step_kernels` builds them once (Metal, or CUDA from the
same sources through Metal/cuda_prelude.cuh), a thin launcher per kernel, and the ops they
replace (the methods' `step`) as the oracle. Without a GPU they are verified by executing the
Metal source on the CPU (tests/metal_emulation). The CUDA twins run only when asked for
(MLX_LINEAR_KERNELS=cuda) until a GPU run has checked them against the oracle.
"""

import os
from importlib import resources

import mlx.core as mx
import numpy as np

SIMDGROUPS = 4  # simdgroups a threadgroup (one threadgroup per batch row and KV head)


def _source(name):
    return resources.files("mlx_linear.Metal").joinpath(name).read_text()


SPECS = {
    "liger": dict(
        name="liger_step",
        input_names=["q", "qf", "k", "kf", "v", "keys", "values", "state", "rot", "sink_rot", "mix", "slot", "scale",
                     "inv_gate_normalizer", "eps"],
        output_names=["y", "state_out", "keys_out", "values_out"],
        source=_source("liger_step.metal"),
    ),
    "lola": dict(
        name="lola_step",
        input_names=["q", "k", "v", "q_map", "k_map", "keys", "values", "block_keys", "block_values", "block_features",
                     "state", "cache_keys", "cache_values", "cache_positions", "rot", "sink_rot", "table", "window_weight", "offset",
                     "slot", "scale", "log_decay"],
        output_names=["y", "keys_out", "values_out", "block_keys_out", "block_values_out", "block_features_out"],
        source=_source("lola_step.metal"),
    ),
    "boundary": dict(
        name="lola_boundary",
        input_names=["state", "cache_keys", "cache_values", "cache_features", "cache_positions", "block_keys",
                     "block_values", "block_features", "block_positions", "start", "log_decay", "unique"],
        output_names=["state_out", "keys_out", "values_out", "features_out", "positions_out"],
        source=_source("lola_boundary.metal"),
    ),
}
THREADGROUP_BYTES = 28 << 10  # of the 32 KB a threadgroup may hold: larger layers take the ops


def make_step_kernels(metal_kernel=None, cuda_kernel=None):
    """{name: kernel} built with `metal_kernel` or `cuda_kernel` (MLX's own where its backend
    is here), else None."""
    if metal_kernel is None and cuda_kernel is None:
        if mx.metal.is_available():
            metal_kernel = mx.fast.metal_kernel
        elif cuda_available():
            cuda_kernel = mx.fast.cuda_kernel
        else:
            return None
    common = _source("step_common.h")
    if metal_kernel is not None:
        return {name: metal_kernel(**spec, header=common) for name, spec in SPECS.items()}
    return {name: cuda_kernel(**spec, header=_source("cuda_prelude.cuh") + common) for name, spec in SPECS.items()}


def cuda_available():
    return getattr(mx, "cuda", None) is not None and mx.cuda.is_available()


_kernels = make_step_kernels()


def ready(name):
    """The kernel `name` where it runs here (Metal; CUDA when asked for), else None."""
    choice = os.environ.get("MLX_LINEAR_KERNELS", "1")
    if _kernels is None or choice == "0" or mx.default_device() != mx.gpu:
        return None
    if not mx.metal.is_available() and choice != "cuda":
        return None
    return _kernels[name]


def scalar(x, dtype=mx.float32):
    """A one-element input: CUDA takes every input as a pointer, so the kernels read x[0]."""
    return mx.array(np.array([x]), dtype=dtype)


def liger_step(method, attention, q, k, v, rope, cache, eps):
    """Liger-GLA's decode step in one launch: (output (B, H, 1, d), new state), the cache's ring
    buffer replaced by the kernel's copy with the token's key and value; None where no kernel
    serves (no GPU kernel, or RoPE without tables)."""
    kernel = ready("liger")
    (B, H, _, d), (Hkv, N, dv) = q.shape, (cache.keys.shape[1], cache.keys.shape[2], cache.values.shape[-1])
    floats = (H // Hkv) * (4 * d + dv + 1 + N) + 3 * d + dv  # its threadgroup arrays (at most)
    if kernel is None or cache.rotation is None or 4 * floats > THREADGROUP_BYTES:
        return None
    qf, kf = (q @ method.q_map, k @ method.k_map) if "q_map" in method else (q, k)  # the maps, before features
    q, qf, k, kf, v = (x.reshape(x.shape[0], x.shape[1], -1) for x in (q, qf, k, kf, v))
    state = cache.state[0]
    mix = method.mix_weight()
    mix = mix.reshape(H) if isinstance(mix, mx.array) else mx.array(np.full(H, mix, np.float32))
    sinks = attention.sinks
    sink_rot = cache.sink_rotation.multipliers
    y, state, cache.keys, cache.values = kernel(
        inputs=[q, qf, k, kf, v, cache.keys, cache.values, state, cache.rotation.multipliers, sink_rot, mix,
                cache.slot.reshape(1), scalar(attention.scale), scalar(1 / method.gate_normalizer), scalar(eps)],
        template=[("Dk", d), ("Dv", dv), ("Dvs", state.shape[-1]), ("N", N), ("R", H // Hkv), ("HKV", Hkv), ("S", sinks),
                  ("P", 2 if sinks else 1), ("NSG", SIMDGROUPS), ("TRADITIONAL", rope.tables.traditional),
                  ("NORMALIZE", bool(method.normalize))],
        grid=(32, SIMDGROUPS, B * Hkv),
        threadgroup=(32, SIMDGROUPS, 1),
        output_shapes=[(B, H, dv), state.shape, cache.keys.shape, cache.values.shape],
        output_dtypes=[mx.float32, mx.float32, cache.keys.dtype, cache.values.dtype],
    )
    return y.reshape(B, H, 1, dv), [state]


def lola_step(method, attention, q, k, v, rope, state, cache):
    """LoLA's decode step between boundaries in one launch (the ops of sparse.step, after the
    boundary's shift where the step has one): (output (B, H, 1, d), new state), the ring buffer
    replaced by the kernel's copy; None where no kernel serves."""
    kernel = ready("lola")
    (B, H, _, d), (Hkv, N) = q.shape, cache.keys.shape[1:3]
    R, C, slots, f = H // Hkv, method.window, method.slots, method.q_map.shape[-1]
    floats = R * (6 * d + 4 * f + N + C + slots + 3) + 3 * d  # its threadgroup arrays
    if kernel is None or cache.rotation is None or 4 * floats > THREADGROUP_BYTES:
        return None
    S, block_keys, block_values, block_features, cache_keys, cache_values, _, positions = state
    outputs = kernel(
        inputs=[x.reshape(B, x.shape[1], -1) for x in (q, k, v)] + [method.q_map, method.k_map, cache.keys, cache.values,
                block_keys, block_values, block_features, S, cache_keys, cache_values, positions, cache.rotation.multipliers,
                cache.sink_rotation.multipliers, rope.tables.fixed.multipliers, mx.sigmoid(method.window_logit).reshape(H),
                cache.offset.reshape(1), cache.slot.reshape(1), scalar(method.scale), scalar(method.log_decay)],
        template=[("Dk", d), ("F", 2 * f), ("FH", f), ("N", N), ("C", C), ("SLOTS", slots), ("SPAN", method.cache_span),
                  ("R", R), ("HKV", Hkv), ("S", method.sinks), ("NSG", SIMDGROUPS), ("TRADITIONAL", rope.tables.traditional),
                  ("AFTER_ROPE", bool(method.after_rope))],
        grid=(32, SIMDGROUPS, B * Hkv),
        threadgroup=(32, SIMDGROUPS, 1),
        output_shapes=[(B, H, d), cache.keys.shape, cache.values.shape, block_keys.shape, block_values.shape, block_features.shape],
        output_dtypes=[mx.float32, cache.keys.dtype, cache.values.dtype, mx.float32, mx.float32, mx.float32],
    )
    y, cache.keys, cache.values, *blocks = outputs
    return y.reshape(B, H, 1, d), [S, *blocks, *state[4:]]


def lola_boundary(ops, S, cache, block, start, sinks, log_decay, horizon, age_decay=0.0, unique=0.0, long_slots=0, sink_state=True):
    """`ops` (sparse.boundary) in one launch where a GPU kernel serves, else None (also with an
    `age_decay`: the kernel ranks by error alone). Differentiable: its gradients are those of
    `ops`, recomputed (training on a GPU)."""
    kernel = ready("boundary")
    slots, C = cache[0].shape[2], block[0].shape[2]
    if kernel is None or age_decay or 23 * (slots + C) > THREADGROUP_BYTES:
        return None
    (B, H, F, _), (Hkv, d) = S.shape, (cache[0].shape[1], cache[0].shape[-1])

    @mx.custom_function
    def fused(S, cache, block, start):
        S, *kept = kernel(
            inputs=[S, *cache, *block, start.reshape(1), scalar(log_decay), scalar(unique)],
            template=[("Dk", d), ("F", F), ("SLOTS", slots), ("C", C), ("R", H // Hkv), ("S", sinks),
                      ("HORIZON", horizon), ("LONG", long_slots), ("SINK_STATE", bool(sink_state)), ("NSG", SIMDGROUPS)],
            grid=(32, SIMDGROUPS, B * Hkv),
            threadgroup=(32, SIMDGROUPS, 1),
            output_shapes=[S.shape] + [x.shape for x in cache],
            output_dtypes=[mx.float32] * 5,
        )
        return S, tuple(kept)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        (S, cache, block, start), (dS, dcache) = primals, cotangents
        # Positions and the start choose the cache (through argsort): no gradient flows into them.
        def differentiable(S, *parts):
            rule = (sinks, log_decay, horizon, 0.0, unique, long_slots, sink_state)
            S, kept = ops(S, (*parts[:3], cache[3]), [*parts[3:], block[3]], start, *rule)
            return [S, *kept[:3]]

        grads = mx.vjp(differentiable, [S, *cache[:3], *block[:3]], [dS, *dcache[:3]])[1]
        zero = mx.zeros_like
        return grads[0], (*grads[1:4], zero(cache[3])), [*grads[4:7], zero(block[3])], zero(start)

    return fused(S, tuple(cache), list(block), start.astype(mx.float32))

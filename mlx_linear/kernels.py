"""Metal kernels for the GLA scan, in mlx-lm's shape (see mlx_lm/models/gated_delta.py).

- `make_kernels`: builds every kernel once, at import; None without Metal.
- `_forward` / `_backward`: thin launchers (grid, threadgroup, template, output shapes).
- The ops reference is `scan.gla_step` / `scan.gla_recurrent`, the oracle of every test.
- `scan_kernel` picks a kernel for `scan.gla_scan`, the one public dispatcher.

The kernel sources are the files in `Metal/` (package `mlx_linear.Metal`). Without a Mac they
are verified by executing that source on the CPU: tests/metal_emulation.
"""

import os
from importlib import resources

import mlx.core as mx

SIMD_WIDTH = 32
COLUMNS_PER_GROUP = 4  # forward: simdgroups (state columns) per threadgroup
ROWS_PER_GROUP = 8  # backward: simdgroups (state rows) per threadgroup
HISTORY_PER_LANE = 64  # backward: floats of recomputed states each lane keeps per chunk


def _source(name):
    return resources.files("mlx_linear.Metal").joinpath(name).read_text()


SPECS = {
    "forward": dict(
        name="gla_recurrent",
        input_names=["q", "k", "v", "log_g", "state_in", "T", "R"],
        output_names=["o", "state_out"],
        source=_source("gla_recurrent.metal"),
    ),
    "backward": dict(
        name="gla_recurrent_vjp",
        input_names=["q", "k", "v", "log_g", "state_in", "dout", "dstate", "T", "R"],
        output_names=["dq", "dk", "dv_blocks", "dlog_g", "dstate_in", "checkpoints"],
        source=_source("gla_recurrent_vjp.metal"),
    ),
}


def make_kernels(metal_kernel=None):
    """{name: kernel} built with `metal_kernel` (mx.fast.metal_kernel where Metal is), else None."""
    if metal_kernel is None:
        if not mx.metal.is_available():
            return None
        metal_kernel = mx.fast.metal_kernel
    return {name: metal_kernel(**spec) for name, spec in SPECS.items()}


_kernels = make_kernels()


def _forward(q, k, v, log_g, state):
    B, H, T, dk = q.shape
    Hs, dv = k.shape[1], v.shape[-1]
    return _kernels["forward"](
        inputs=[q, k, v, log_g, state, T, H // Hs],
        template=[("Dk", dk), ("Dv", dv)],
        grid=(SIMD_WIDTH, dv, B * Hs),
        threadgroup=(SIMD_WIDTH, COLUMNS_PER_GROUP, 1),
        output_shapes=[(B, H, T, dv), state.shape],
        output_dtypes=[mx.float32, mx.float32],
    )


def _backward(q, k, v, log_g, state, dout, dstate):
    B, H, T, dk = q.shape
    Hs, dv = k.shape[1], v.shape[-1]
    chunk = max(1, HISTORY_PER_LANE * SIMD_WIDTH // dv)
    blocks = dk // ROWS_PER_GROUP
    dq, dk_, dv_blocks, dlog_g, dstate_in, _ = _kernels["backward"](
        inputs=[q, k, v, log_g, state, dout.astype(mx.float32), dstate.astype(mx.float32), T, H // Hs],
        template=[("Dk", dk), ("Dv", dv), ("W", ROWS_PER_GROUP), ("C", chunk)],
        grid=(SIMD_WIDTH, dk, B * Hs),
        threadgroup=(SIMD_WIDTH, ROWS_PER_GROUP, 1),
        output_shapes=[q.shape, k.shape, (blocks, B, Hs, T, dv), k.shape, state.shape, (B, Hs, -(-T // chunk), dk, dv)],
        output_dtypes=[mx.float32] * 6,
    )
    return dq, dk_, dv_blocks.sum(axis=0), dlog_g, dstate_in


@mx.custom_function
def _gla_metal(q, k, v, log_g, state):
    return tuple(_forward(q, k, v, log_g, state))


@_gla_metal.vjp
def _gla_metal_vjp(primals, cotangents, _outputs):
    grads = _backward(*primals, *cotangents)
    return tuple(g.astype(p.dtype) for g, p in zip(grads, primals))


def _pad_last(x, axis_sizes):
    widths = [(0, 0)] * x.ndim
    for axis, size in axis_sizes:
        widths[axis] = (0, size - x.shape[axis])
    return mx.pad(x, widths) if any(w for _, w in widths) else x


def gla_metal(q, k, v, log_g, state):
    """gla_recurrent in one kernel launch (and one for the gradients): float32 state and outputs.

    Takes log_g of k's shape and a float32 state. Head dims that are not multiples of 32 are
    zero-padded (zero keys and zero log-gates leave the padded state rows at zero).
    """
    dk, dv = q.shape[-1], v.shape[-1]
    dk_pad, dv_pad = -(-dk // SIMD_WIDTH) * SIMD_WIDTH, -(-dv // SIMD_WIDTH) * SIMD_WIDTH
    dtypes = {x.dtype for x in (q, k, v, log_g)}
    dtype = dtypes.pop() if len(dtypes) == 1 and q.dtype in (mx.float16, mx.bfloat16) else mx.float32
    q, k, log_g = (_pad_last(x.astype(dtype), [(-1, dk_pad)]) for x in (q, k, log_g))
    v = _pad_last(v.astype(dtype), [(-1, dv_pad)])
    state = _pad_last(state, [(-2, dk_pad), (-1, dv_pad)])
    o, state = _gla_metal(q, k, v, log_g, state)
    return o[..., :dv], state[..., :dk, :dv]


def _metal_ready():
    return _kernels is not None and mx.default_device() == mx.gpu


def scan_kernel():
    """The kernel for gla_scan on this device, or None for the pure-MLX scans.

    MLX_LINEAR_KERNELS=0 turns kernels off. A CUDA kernel (mx.fast.cuda_kernel) would be one
    more branch here.
    """
    if os.environ.get("MLX_LINEAR_KERNELS", "1") == "0":
        return None
    if _metal_ready():
        return gla_metal
    return None

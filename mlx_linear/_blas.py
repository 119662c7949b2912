"""Load the system OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS; preloading OpenBLAS with RTLD_GLOBAL makes
MLX's float32 matmul resolve to it (measured 5.7 -> 200 GFLOP/s on a 2-core x86 box).
"""

import ctypes
import os
import sys

CANDIDATES = ("libopenblas.so.0", "libopenblas.so")
TOO_LATE = (
    "mlx-linear: mlx.core was imported before mlx_linear, so MLX's CPU matmul runs without OpenBLAS "
    "(~35x slower): import mlx_linear first, or run with LD_PRELOAD={} (e.g. for mlx_lm.generate or mlx_lm.server)\n"
)


def use_system_blas() -> str | None:
    """Preload OpenBLAS if present; returns the library loaded, or None."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_LINEAR_BLAS") == "0":
        return None
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if sys.modules.get("mlx.core") is not None:  # too late: MLX already resolved its BLAS symbols
            sys.stderr.write(TOO_LATE.format(name))
            return None
        return name
    return None


LOADED = use_system_blas()

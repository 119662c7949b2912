"""Shared pieces of the benchmark scripts: machine description and JSON results."""

import os
import platform
import time
from pathlib import Path

import mlx_linear  # noqa: F401  (BLAS before mlx)
import mlx.core as mx
from mlx_linear import files

RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # the benchmarks' offline copy


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": mlx_linear.BLAS,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name, data) -> Path:
    """bench/results/NAME.json, with the machine it was measured on."""
    path = RESULTS / f"{name}.json"
    files.write_json(path, {"machine": machine(), **data})
    return path

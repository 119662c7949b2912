"""Shared pieces of the benchmark scripts: machine description and JSON results."""

import json
import os
import platform
import time
from pathlib import Path

import mlx_linear  # noqa: F401  (BLAS before mlx)
import mlx.core as mx

RESULTS = Path(__file__).parent / "results"


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
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    tmp.replace(path)
    return path

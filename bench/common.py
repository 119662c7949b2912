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


def median_seconds(run, repeats):
    """The median wall time of `run()` (which evaluates what it computes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def read_bandwidth(megabytes=512, repeats=5) -> float:
    """Bytes/s a BLAS float32 matrix-vector product reads: what bounds a decode step, which
    reads every weight once (MLX's own CPU reductions and copies read far slower)."""
    cols = 8192
    matrix = mx.random.normal((megabytes * 2**20 // (4 * cols), cols))
    vector = mx.random.normal((1, cols))
    mx.eval(matrix, vector)
    return matrix.nbytes / median_seconds(lambda: mx.eval(vector @ matrix.T), repeats)


def matmul_rate(n=2048, repeats=3) -> float:
    """FLOP/s of a float32 n x n matrix product: what bounds a prefill."""
    a = mx.random.normal((n, n))
    mx.eval(a)
    return 2 * n**3 / median_seconds(lambda: mx.eval(a @ a), repeats)


def prefilled(model, tokens, prefill_step):
    """(cache, the next token (1,), seconds): `tokens` (1, L) through the model in steps."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    start = time.perf_counter()
    for i in range(0, tokens.shape[1], prefill_step):
        logits = model(tokens[:, i : i + prefill_step], cache=cache)
        mx.eval([c.state for c in cache])
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token)
    return cache, token, time.perf_counter() - start


def batch_of(cache, batch):
    """One sequence's cache as `batch` rows of mlx-lm's batch caches (`merge`: what BatchGenerator
    and mlx_lm.server decode with). Copies: a batched decode's speed needs full caches, not
    distinct ones (16 prefills of 16k tokens would cost a CPU bench its hour, a GPU its minutes)."""
    rows = [c.merge([c] * batch) for c in cache]
    mx.eval([c.state for c in rows])
    return rows


def decode_seconds(model, cache, token, steps):
    """The median seconds of a greedy decode step of every row of `cache` (two steps warm up)."""
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]

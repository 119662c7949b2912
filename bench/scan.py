"""Speed of the GLA scan: the Metal kernel against the pure-MLX scans, and softmax attention
(mx.fast.scaled_dot_product_attention, what the original transformer runs) at the same shapes.

    python bench/scan.py [--heads 9,3] [--dim 64] [--prompt 4096] [--decode-steps 256]

Decode: one token at a time, carrying the state (softmax attention: one query against a KV cache
of `--prompt` tokens). Prefill: `--prompt` tokens in one call. Train: prefill plus the gradient
of every input. Where no kernel runs (no Metal, or not the GPU) the kernel rows say so.
"""

import argparse
import os
import time

from common import write_json

import mlx.core as mx

from mlx_linear import kernels
from mlx_linear.scan import gla_scan


def inputs(B, H, Hs, L, d):
    q = mx.softmax(mx.random.normal((B, H, L, d)), axis=-1)
    k = mx.softmax(mx.random.normal((B, Hs, L, d)), axis=-1)
    v = mx.random.normal((B, Hs, L, d))
    log_g = mx.log(mx.sigmoid(mx.random.normal((B, Hs, L, d)))) / 16
    mx.eval(q, k, v, log_g)
    return q, k, v, log_g


def timed(run, repeats):
    """Best wall time of `repeats` runs after one warm-up (compilation), and the peak memory."""
    mx.eval(run())
    best = float("inf")
    mx.reset_peak_memory()
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - start)
    return best, mx.get_peak_memory() / 1e6


def scan_runs(q, k, v, log_g, steps):
    state = mx.zeros((q.shape[0], k.shape[1], q.shape[-1], v.shape[-1]))

    def decode():
        s = state
        for t in range(steps):
            _, s = gla_scan(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], log_g[:, :, t : t + 1], s)
            mx.eval(s)  # as generation does, one token at a time
        return s

    def loss(*args):
        o, s = gla_scan(*args)
        return o.sum() + s.sum()

    return {
        "decode": decode,
        "prefill": lambda: gla_scan(q, k, v, log_g),
        "train": lambda: mx.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_g),
    }


def softmax_runs(q, k, v, steps):
    scale = q.shape[-1] ** -0.5

    def decode():
        out = None
        for t in range(steps):
            out = mx.fast.scaled_dot_product_attention(q[:, :, t : t + 1], k, v, scale=scale)
            mx.eval(out)
        return out

    def loss(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal").sum()

    return {
        "decode": decode,
        "prefill": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
        "train": lambda: mx.grad(loss, argnums=(0, 1, 2))(q, k, v),
    }


def measure(runs, tokens, repeats):
    rows = {}
    for mode, run in runs.items():
        seconds, peak = timed(run, repeats)
        rows[mode] = {"tokens_per_second": tokens[mode] / seconds, "seconds": seconds, "peak_memory_mb": peak}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="9,3", help="query heads,state (KV) heads (default: SmolLM2-135M)")
    parser.add_argument("--dim", type=int, default=64, help="head dimension")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    H, Hs = map(int, args.heads.split(","))
    mx.random.seed(0)
    q, k, v, log_g = inputs(args.batch, H, Hs, args.prompt, args.dim)
    tokens = {"decode": args.batch * args.decode_steps, "prefill": args.batch * args.prompt, "train": args.batch * args.prompt}

    results = {}
    os.environ["MLX_LINEAR_KERNELS"] = "0"
    results["pure-mlx"] = measure(scan_runs(q, k, v, log_g, args.decode_steps), tokens, args.repeats)
    os.environ["MLX_LINEAR_KERNELS"] = "1"
    kernel_available = kernels.scan_kernel() is not None
    if kernel_available:
        results["kernel"] = measure(scan_runs(q, k, v, log_g, args.decode_steps), tokens, args.repeats)
    # GQA for softmax attention: every query head against its KV head.
    results["softmax"] = measure(softmax_runs(q, k, v, args.decode_steps), tokens, args.repeats)

    note = "" if kernel_available else (
        "no kernel here: it needs Metal and the GPU as default device "
        f"(metal available: {mx.metal.is_available()}, device: {mx.default_device()})")
    ratios = {f"{path}_vs_softmax": {mode: row[mode]["tokens_per_second"] / results["softmax"][mode]["tokens_per_second"] for mode in row}
              for path, row in results.items() if path != "softmax"}
    if kernel_available:
        ratios["kernel_vs_pure-mlx"] = {mode: results["kernel"][mode]["tokens_per_second"] / results["pure-mlx"][mode]["tokens_per_second"]
                                        for mode in tokens}
    shape = {"batch": args.batch, "query_heads": H, "state_heads": Hs, "head_dim": args.dim, "prompt": args.prompt,
             "decode_steps": args.decode_steps}

    print(f"GLA scan, batch {args.batch}, heads {H}/{Hs}, head dim {args.dim}, prompt {args.prompt}, device {mx.default_device()}")
    print(f"{'path':10} {'mode':8} {'tokens/s':>12} {'peak MB':>9} {'x softmax':>10}")
    for path in ("kernel", "pure-mlx", "softmax"):
        if path not in results:
            print(f"{path:10} {'-':8} {'unavailable':>12}   ({note})")
            continue
        for mode, row in results[path].items():
            ratio = results[path][mode]["tokens_per_second"] / results["softmax"][mode]["tokens_per_second"]
            print(f"{path:10} {mode:8} {row['tokens_per_second']:12.0f} {row['peak_memory_mb']:9.1f} {ratio:10.2f}")
    path = write_json("scan", {"shape": shape, "kernel_available": kernel_available, "note": note, "results": results, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Scoring choices from a branched context cache against re-running the context for every choice.

On the bundled SmolLM2-135M-Instruct, linearized (Liger-GLA) and original (mlx-lm's llama):
the choices of real task documents, then synthetic contexts of growing length with four
20-token continuations. Modes (mlx_linear.eval.scoring): rerun = every choice from scratch,
what lm-eval does; branch = context once, each choice from a deep copy of its cache;
batched = context once, all choices as one batch from copies of its cache. Speedups are
against rerun on the same model, and against mlx-lm running the original with rerun.

    python bench/eval_branching.py [--docs 8] [--tasks hellaswag,piqa] [--lengths 64,256,1024] [--repeats 3]
"""

import argparse
import time
from itertools import islice
from pathlib import Path

from common import RESULTS, SHARED_DATA, write_json

import mlx_linear
from mlx_linear.convert import bundled_model
from mlx_linear.eval.data import data_dir
from mlx_linear.eval.scoring import MODES, Scorer, encode_pair
from mlx_linear.eval.tasks import get_task
from mlx_linear.plot import line_plot

MODELS = {"liger-gla": "liger-gla", "original": "none"}


def timed(scorer, groups):
    """Seconds to score every group of (context, continuation) token pairs, and the scores."""
    start = time.perf_counter()
    scores = [scorer.score_tokens(pairs) for pairs in groups]
    return time.perf_counter() - start, [ll for group in scores for ll, _ in group]


def task_groups(task_name, tokenizer, docs):
    task = get_task(task_name)
    documents = islice(task.documents(data_dir(SHARED_DATA), None), docs + 1)  # the first one warms up
    return [[encode_pair(tokenizer, c, x) for c, x in task.requests(d)] for d in documents]


def synthetic_groups(tokenizer, length, choices=4, continuation=20):
    text = get_task("wikitext2").read(data_dir(SHARED_DATA))[:200_000]
    tokens = tokenizer.encode(text)
    context = tokens[:length]
    pairs = [(context, tokens[length + i * continuation : length + (i + 1) * continuation]) for i in range(choices)]
    return [pairs]


def compare_modes(model, groups, warmup, repeats):
    """{mode: seconds (the best of `repeats`, modes interleaved: the CPU may be shared), tokens
    the model read, largest difference from rerun's log-likelihoods}."""
    out, lls = {m: {"seconds": float("inf")} for m in MODES}, {}
    for mode in MODES:
        timed(Scorer(model, None, mode=mode), warmup)
    for _ in range(repeats):
        for mode in MODES:
            scorer = Scorer(model, None, mode=mode)
            seconds, lls[mode] = timed(scorer, groups)
            out[mode] = {"seconds": min(seconds, out[mode]["seconds"]), "tokens_run": scorer.tokens}
    for mode, r in out.items():
        r["max_abs_diff_vs_rerun"] = max(abs(a - b) for a, b in zip(lls[mode], lls["rerun"]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--tasks", default="hellaswag,piqa")
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=3, help="Best of N, modes interleaved.")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {"docs": args.docs, "repeats": args.repeats, "tasks": {}, "context_lengths": {}}
    for label, method in MODELS.items():
        model, tokenizer = mlx_linear.load(bundled_model(method))
        for task in args.tasks.split(","):
            groups = task_groups(task, tokenizer, args.docs)
            modes = compare_modes(model, groups[1:], groups[:1], args.repeats)
            results["tasks"].setdefault(task, {})[label] = modes
            print(label, task, {m: f"{r['seconds'] / args.docs:.3f} s/doc" for m, r in modes.items()}, flush=True)
        for length in lengths:
            groups, warmup = synthetic_groups(tokenizer, length), synthetic_groups(tokenizer, 8)
            modes = compare_modes(model, groups, warmup, args.repeats)
            results["context_lengths"].setdefault(str(length), {})[label] = modes
            print(label, f"context {length}", {m: f"{r['seconds']:.2f} s" for m, r in modes.items()}, flush=True)
    add_speedups(results)
    report(results)
    write_json("eval_branching", results)
    plot(results, lengths)


def add_speedups(results):
    for section in ("tasks", "context_lengths"):
        for runs in results[section].values():
            mlx_lm_rerun = runs["original"]["rerun"]["seconds"]
            for modes in runs.values():
                for r in modes.values():
                    r["speedup_vs_rerun"] = modes["rerun"]["seconds"] / r["seconds"]
                    r["speedup_vs_mlx_lm_rerun"] = mlx_lm_rerun / r["seconds"]


def report(results):
    print("\n| workload | model | rerun s | branch s | batched s | batched vs rerun | batched vs mlx-lm rerun |")
    print("|---|---|---|---|---|---|---|")
    rows = [(f"{t} ({results['docs']} docs)", runs) for t, runs in results["tasks"].items()]
    rows += [(f"context {n} + 4x20", runs) for n, runs in results["context_lengths"].items()]
    for name, runs in rows:
        for label, m in runs.items():
            print(
                f"| {name} | {label} | {m['rerun']['seconds']:.2f} | {m['branch']['seconds']:.2f} "
                f"| {m['batched']['seconds']:.2f} | {m['batched']['speedup_vs_rerun']:.2f}x "
                f"| {m['batched']['speedup_vs_mlx_lm_rerun']:.2f}x |"
            )


def plot(results, lengths):
    runs = results["context_lengths"]
    seconds = {
        f"{label} {mode}": (lengths, [runs[str(n)][label][mode]["seconds"] for n in lengths])
        for label in MODELS
        for mode in MODES
    }
    speedup = {
        f"{label} batched / rerun": (lengths, [runs[str(n)][label]["batched"]["speedup_vs_rerun"] for n in lengths])
        for label in MODELS
    }
    path = line_plot(
        Path(RESULTS) / "eval_branching.png",
        [
            {"x": "context tokens", "y": "seconds (4 x 20-token choices)", "series": seconds, "logx": True, "logy": True},
            {"x": "context tokens", "y": "speedup over rerun", "series": speedup, "logx": True},
        ],
        title="Scoring 4 choices: branched context cache vs rerun (SmolLM2-135M, CPU)",
    )
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

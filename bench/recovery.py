"""The recovery benchmark: how much of the original SmolLM2-135M-Instruct does linearization
keep, untrained and after lora-train on general text mixed with chat data?

    python bench/recovery.py --variant paper --variant ours --tokens 200000 --limit 300

Writes bench/results/recovery.json, recovery.md (the tables) and recovery.png (validation
cross-entropy during training); the runs (converted model, adapter, logs) stay in
bench/results/recovery/<variant>/. Evaluations are cached in recovery_evals.json, so a rerun
with more tokens or variants only evaluates what changed.
"""

import argparse
import json
import time

from common import RESULTS, SHARED_DATA, write_json

import mlx_linear
from mlx_linear import files
from mlx_linear.convert import bundled_model, convert
from mlx_linear.eval.report import RECOVERY_NOTE, average, compare, number, percent, ratio
from mlx_linear.eval.runner import evaluate
from mlx_linear.plot import line_plot
from mlx_linear.train import TrainConfig, load_source, train

DATA = SHARED_DATA
TASKS = ("piqa", "arc_easy", "hellaswag", "lambada", "wikitext2")

# name -> (conversion options, training options)
OURS = {"sinks": 4, "options": {"normalize": True, "mix": 0.1, "learned_mix": True, "feature_proj": True}}
VARIANTS = {
    # Liger as published: 0.5 linear + 0.5 window, LoRA q,k,v with cross-entropy.
    "paper": ({}, {"objective": "ce"}),
    # Four attention sinks in the window, the linear branch normalised and mixed in at 0.1
    # (learned per head), learned feature maps for the linear branch; cross-entropy.
    "ours": (OURS, {"objective": "ce", "method_lr": 1e-2}),
    # The same with distillation from the original (slower, and behind at small budgets).
    "ours-distill": (OURS, {"objective": "distill", "method_lr": 1e-2}),
}


def cached_evaluation(cache_file, key, model_path, adapter, options):
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        print(f"evaluating {key}", flush=True)
        model, tokenizer = mlx_linear.load(model_path, adapter_path=adapter)
        start = time.perf_counter()
        cache[key] = {"metrics": evaluate(model, tokenizer, **options), "seconds": time.perf_counter() - start}
        files.write_json(cache_file, cache)
    return cache[key]["metrics"]


def side_by_side(original, results):
    """One row per task and metric: the original's value, then each variant untrained and
    uptrained with its recovery (model / original; perplexity inverted)."""
    columns = [(f"{name} {stage}", r[stage]) for name, r in results.items() for stage in ("untrained", "uptrained")]
    rows = ["| task | metric | original | " + " | ".join(c for c, _ in columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for task, metrics in original.items():
        for metric, value in metrics.items():
            cells = [f"{number(m[task][metric], metric)} ({percent(ratio(metric, m[task][metric], value))})" for _, m in columns]
            rows.append(f"| {task} | {metric} | {number(value, metric)} | " + " | ".join(cells) + " |")
    cells = [f"{number(average(m))} ({percent(average(m) / average(original))})" for _, m in columns]
    rows.append(f"| average | primary | {number(average(original))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_variant(name, args, sources, evaluate_cached):
    conversion, training = VARIANTS[name]
    folder = RESULTS / "recovery" / name
    model_path = folder / "model"
    if not (model_path / "config.json").is_file():
        convert(model_path, force=True, **conversion)
    config = TrainConfig(seq_len=args.seq_len, tokens=args.tokens, val_every=args.val_every, seed=args.seed, **training)
    adapter = folder / f"adapter-{args.tokens}"
    state_file = adapter / "state.json"
    if not (state_file.is_file() and json.loads(state_file.read_text())["update"] >= config.updates):
        model, tokenizer = mlx_linear.load(model_path)
        resume = state_file.is_file()
        start = time.perf_counter()
        train(model, tokenizer, sources, config, adapter, resume=resume, force=not resume)
        print(f"{name}: trained in {time.perf_counter() - start:.0f}s", flush=True)
    state = json.loads(state_file.read_text())
    return {
        "conversion": conversion,
        "training": {**training, "tokens": state["tokens"], "seq_len": args.seq_len},
        "untrained": evaluate_cached(f"{name}|untrained", model_path, None),
        "uptrained": evaluate_cached(f"{name}|{args.tokens}", model_path, adapter),
        "validation": [(e["tokens"], e["val"]["all"]["ce"]) for e in state["log"] if "val" in e],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable [ours]")
    parser.add_argument("--tokens", type=int, default=150_000, help="training budget per variant")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--data-weights", default="0.7,0.3", help="general text, chat")
    parser.add_argument("--limit", type=int, default=250, help="documents per task")
    parser.add_argument("--wikitext-windows", type=int, default=8, help="1024-token windows")
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = args.variant or ["ours"]
    text_weight, chat_weight = map(float, args.data_weights.split(","))
    sources = [
        load_source(DATA / "gentext", text_weight, seed=args.seed),
        load_source(DATA / "instruct" / "sft_messages.jsonl", chat_weight, seed=args.seed),
    ]
    options = {"tasks": TASKS, "limit": args.limit, "task_limits": {"wikitext2": args.wikitext_windows}, "data_dir": DATA}
    cache_file = RESULTS / "recovery_evals.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"|limit={args.limit}|wikitext={args.wikitext_windows}"

    def evaluate_cached(key, model_path, adapter):
        return cached_evaluation(cache_file, key + suffix, model_path, adapter, options)

    original = evaluate_cached("original", bundled_model("none"), None)
    results = {name: run_variant(name, args, sources, evaluate_cached) for name in variants}

    for r in results.values():
        r.update({f"{stage}_vs_original": compare(r[stage], original) for stage in ("untrained", "uptrained")})
    lines = [f"# Recovery of SmolLM2-135M-Instruct ({args.tokens:,} training tokens, {args.limit} documents a task, "
             f"WikiText-2 {args.wikitext_windows} x 1024 tokens)", "", side_by_side(original, results), "", RECOVERY_NOTE]
    report = "\n".join(lines) + "\n"
    print(report)
    (RESULTS / "recovery.md").write_text(report)
    series = {name: tuple(zip(*r["validation"])) for name, r in results.items()}
    line_plot(RESULTS / "recovery.png", [{"x": "training tokens", "y": "validation cross-entropy", "series": series}],
              title="lora-train on SmolLM2-135M-Instruct (general text 70%, chat 30%)")
    path = write_json("recovery", {"original": original, "variants": results, "arguments": vars(args)})
    print(f"wrote {path}, {RESULTS / 'recovery.md'}, {RESULTS / 'recovery.png'}")


if __name__ == "__main__":
    main()

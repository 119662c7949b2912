"""The recovery benchmark: how much of the original SmolLM2-135M-Instruct does linearization
keep, untrained and after lora-train on general text mixed with chat data?

    python bench/recovery.py --variant paper --variant ours --tokens 200000 --limit 300

Beside the benchmark average it reports what lies beyond the 64-token window: WikiText-2 and
held-out general text by position (windows of --long-window tokens), each uptrained variant with
its recurrent state on and off (the state's share of the gap to the original), and passkey
retrieval at 512-4k tokens. A variant with `transfer_tokens` trains two stages: attention
transfer of the method's own parameters, then LoRA with cross-entropy from there.

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
from mlx_linear.eval.report import RECOVERY_NOTE, STATE_NOTE, average, compare, number, percent, ratio, share
from mlx_linear.eval.runner import evaluate
from mlx_linear.plot import line_plot
from mlx_linear.train import TrainConfig, load_source, train

DATA = SHARED_DATA
TASKS = ("piqa", "arc_easy", "hellaswag", "lambada", "wikitext2")
LONG_TASKS = ("wikitext2", "gentext", "passkey")  # by position, beyond the window

# name -> (conversion options, training options, stage-1 attention-transfer options or None)
OURS = {"sinks": 4, "options": {"normalize": True, "mix": 0.1, "learned_mix": True, "feature_proj": True}}
VARIANTS = {
    # Liger as published: 0.5 linear + 0.5 window, LoRA q,k,v with cross-entropy.
    "paper": ({}, {"objective": "ce"}, None),
    # Four attention sinks in the window, the linear branch normalised and mixed in at 0.1
    # (learned per head), learned feature maps for the linear branch; cross-entropy.
    "ours": (OURS, {"objective": "ce", "method_lr": 1e-2}, None),
    # The same with distillation from the original (slower, and behind at small budgets).
    "ours-distill": (OURS, {"objective": "distill", "method_lr": 1e-2}, None),
    # LoLCATs: attention transfer of the Hedgehog maps and window factors (one sequence an
    # update, so the factors get enough Adam steps), then LoRA with cross-entropy.
    "lolcats": ({"method": "lolcats", "sinks": 4}, {"objective": "ce", "method_lr": 1e-3},
                {"method_lr": 1e-2, "grad_accumulation": 1}),
    # The same with the maps before RoPE (a position-free linear term) and a 256-token half-life.
    "lolcats-pre-rope": ({"method": "lolcats", "sinks": 4, "options": {"after_rope": False, "half_life": 256}},
                         {"objective": "ce", "method_lr": 1e-3, "grad_accumulation": 4},
                         {"method_lr": 1e-2, "grad_accumulation": 1}),
    # The paper's other gate forms, with ours' four sinks (they have no normaliser or maps).
    "liger-hgrn2": ({"method": "liger-hgrn2", "sinks": 4}, {"objective": "ce"}, None),
    "liger-gsa": ({"method": "liger-gsa", "sinks": 4}, {"objective": "ce"}, None),
    # GSA with ours' learned per-head mix, from 0.1: training can weigh its slots down.
    "liger-gsa-mix": ({"method": "liger-gsa", "sinks": 4, "options": {"mix": 0.1, "learned_mix": True}},
                      {"objective": "ce", "method_lr": 1e-2}, None),
}


def cached_evaluation(cache_file, key, model_path, adapter, options, use_state=True):
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        print(f"evaluating {key}", flush=True)
        model, tokenizer = mlx_linear.load(model_path, adapter_path=adapter)
        if not use_state:
            model.use_state(False)
        start = time.perf_counter()
        cache[key] = {"metrics": evaluate(model, tokenizer, **options), "seconds": time.perf_counter() - start}
        files.write_json(cache_file, cache)
    return cache[key]["metrics"]


def side_by_side(original, results):
    """One row per task and metric: the original's value, then each variant untrained and
    uptrained with its recovery (model / original; perplexity inverted)."""
    columns = [(f"{name} {stage}", r[stage]) for name, r in results.items() for stage in ("untrained", "uptrained")
               if r[stage] is not None]
    rows = ["| task | metric | original | " + " | ".join(c for c, _ in columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for task, metrics in original.items():
        for metric, value in metrics.items():
            cells = [f"{number(m[task][metric], metric)} ({percent(ratio(metric, m[task][metric], value))})" for _, m in columns]
            rows.append(f"| {task} | {metric} | {number(value, metric)} | " + " | ".join(cells) + " |")
    cells = [f"{number(average(m))} ({percent(average(m) / average(original))})" for _, m in columns]
    rows.append(f"| average | primary | {number(average(original))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def trained(model_path, folder, sources, config):
    """Train (or resume) a run in `folder` to config's budget; its state."""
    state_file = folder / "state.json"
    if not (state_file.is_file() and json.loads(state_file.read_text())["update"] >= config.updates):
        model, tokenizer = mlx_linear.load(model_path)
        resume = state_file.is_file()
        start = time.perf_counter()
        train(model, tokenizer, sources, config, folder, resume=resume, force=not resume)
        print(f"{folder}: trained in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(state_file.read_text())


def run_variant(name, args, sources, evaluate_cached):
    conversion, training, transfer = VARIANTS[name]
    folder = RESULTS / "recovery" / name
    model_path = folder / "model"
    if not (model_path / "config.json").is_file():
        convert(model_path, force=True, **conversion)
    common = dict(seq_len=args.seq_len, val_every=args.val_every, seed=args.seed)
    log, stage1 = [], None
    if transfer:
        stage1 = folder / f"transfer-{args.transfer_tokens}"
        config = TrainConfig(objective="transfer", tokens=args.transfer_tokens, **common, **transfer)
        log += [(e["tokens"], e["val"]["all"]["ce"]) for e in trained(model_path, stage1, sources, config)["log"] if "val" in e]
        training = {**training, "init_adapter": str(stage1)}
    adapter = folder / (f"adapter-{args.tokens}" + (f"-after-{args.transfer_tokens}" if transfer else ""))
    state = trained(model_path, adapter, sources, TrainConfig(tokens=args.tokens, **common, **training))
    offset = log[-1][0] if log else 0
    tag = adapter.name
    return {
        "conversion": conversion,
        "training": {**training, "tokens": state["tokens"], "seq_len": args.seq_len, "transfer": transfer,
                     "transfer_tokens": args.transfer_tokens if transfer else 0},
        "untrained": None if args.skip_untrained else evaluate_cached(f"{name}|untrained", model_path, None),
        "uptrained": evaluate_cached(f"{name}|{tag}", model_path, adapter),
        "long": evaluate_cached(f"{name}|{tag}", model_path, adapter, long=True),
        "long_state_off": evaluate_cached(f"{name}|{tag}", model_path, adapter, long=True, use_state=False),
        "validation": log + [(offset + e["tokens"], e["val"]["all"]["ce"]) for e in state["log"] if "val" in e],
    }


def long_table(original, results):
    """By position and passkey: the original, then each variant with its state on, off, and the share."""
    columns = ["original"] + [f"{n} {c}" for n in results for c in ("state on", "state off", "state share")]
    rows = ["| task | metric | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for task, metrics in original.items():
        for metric, value in metrics.items():
            cells = [number(value, metric)]
            for r in results.values():
                on, off = r["long"][task][metric], r["long_state_off"][task][metric]
                cells += [number(on, metric), number(off, metric), percent(share(on, off, value))]
            rows.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable [ours]")
    parser.add_argument("--tokens", type=int, default=150_000, help="training budget per variant")
    parser.add_argument("--transfer-tokens", type=int, default=100_000, help="stage-1 budget of two-stage variants")
    parser.add_argument("--long-window", type=int, default=4096, help="tokens per window, by-position perplexity")
    parser.add_argument("--long-windows", type=int, default=2, help="windows of WikiText-2 and of held-out text")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--data-weights", default="0.7,0.3", help="general text, chat")
    parser.add_argument("--limit", type=int, default=250, help="documents per task")
    parser.add_argument("--wikitext-windows", type=int, default=8, help="1024-token windows")
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-untrained", action="store_true", help="evaluate only the uptrained models (saves ~12 min a variant)")
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

    long_options = {"tasks": LONG_TASKS, "window": args.long_window, "data_dir": DATA,
                    "task_limits": {"wikitext2": args.long_windows, "gentext": args.long_windows}}
    long_suffix = f"|long={args.long_window}x{args.long_windows}"

    def evaluate_cached(key, model_path, adapter, long=False, use_state=True):
        if long:
            key = f"{key}{long_suffix}" + ("" if use_state else "|state-off")
            return cached_evaluation(cache_file, key, model_path, adapter, long_options, use_state)
        return cached_evaluation(cache_file, key + suffix, model_path, adapter, options)

    original = evaluate_cached("original", bundled_model("none"), None)
    original_long = evaluate_cached("original", bundled_model("none"), None, long=True)
    results = {name: run_variant(name, args, sources, evaluate_cached) for name in variants}

    for r in results.values():
        r.update({f"{stage}_vs_original": compare(r[stage], original) for stage in ("untrained", "uptrained") if r[stage]})
    lines = [f"# Recovery of SmolLM2-135M-Instruct ({args.tokens:,} training tokens, {args.limit} documents a task, "
             f"WikiText-2 {args.wikitext_windows} x 1024 tokens)", "", side_by_side(original, results), "", RECOVERY_NOTE,
             "", f"## Beyond the window (uptrained; windows of {args.long_window} tokens, {args.long_windows} of "
             "WikiText-2 and of held-out general text; passkey at 512-4k tokens)", "", long_table(original_long, results),
             "", STATE_NOTE]
    report = "\n".join(lines) + "\n"
    print(report)
    (RESULTS / "recovery.md").write_text(report)
    series = {name: tuple(zip(*r["validation"])) for name, r in results.items()}
    line_plot(RESULTS / "recovery.png", [{"x": "training tokens", "y": "validation cross-entropy", "series": series}],
              title="lora-train on SmolLM2-135M-Instruct (general text 70%, chat 30%)")
    path = write_json("recovery", {"original": original, "original_long": original_long, "variants": results,
                                   "arguments": vars(args)})
    print(f"wrote {path}, {RESULTS / 'recovery.md'}, {RESULTS / 'recovery.png'}")


if __name__ == "__main__":
    main()

"""LoLA's sparse cache on a trained LoLCATs adapter: what `slots` exact keys per KV head add
beyond the window, beside the same parameters with the state alone and with the window alone.

    python bench/lola.py --adapter mlx_linear/trained_adapters/smollm2-135m-instruct-lola --slots 256,512

The bundled SmolLM2 is converted as the adapter's conversion.json says (LoLCATs), as LoLA with
the same options, its LoLA options too (the chat's cache rule), and each number of slots (the
same weights and adapter: LoLA is an inference change), and as the original. Each is evaluated on WikiText-2 and held-out general text by
position (--windows windows of --window tokens) and passkey at 512-4k tokens; LoLCATs also with
its state off (the window and sinks alone), against which every row's share of the gap to the
original is taken. Evaluations are cached in bench/results/lola_evals.json.
Writes bench/results/lola.json, lola.md and lola.png (perplexity by position).
"""

import argparse
import hashlib
import json
from pathlib import Path

from common import RESULTS, SHARED_DATA, write_json
from recovery import LONG_TASKS, cached_evaluation

from mlx_linear.adapters import ADAPTER_FILE
from mlx_linear.convert import bundled_model
from mlx_linear.convert.convert import method_options
from mlx_linear.eval.report import number, percent, share
from mlx_linear.methods import METHODS
from mlx_linear.plot import line_plot

BUCKETS = ("ppl@64-256", "ppl@256-1k", "ppl@1k-4k")


def models(conversion, slots, horizon):
    """[(name, converted folder, use_state)]: the window alone, LoLCATs, LoLA per slots (with the
    conversion's other LoLA options)."""
    options = conversion.get("options", {})
    lolcats_options = method_options(METHODS["lolcats"])
    lolcats = bundled_model(**{**conversion, "method": "lolcats", "options": {k: v for k, v in options.items() if k in lolcats_options}})
    rows = [("window alone", lolcats, False), ("LoLCATs (state)", lolcats, True)]
    for n in slots:
        lola = {**conversion, "method": "lola", "options": {**options, "slots": n, "horizon": horizon}}
        rows.append((f"LoLA, {n} slots, horizon {horizon} (state + cache)", bundled_model(**lola), True))
    return rows


def table(original, results, window_alone):
    """One row per model: each metric, and its share of the window-alone model's gap."""
    metrics = [(task, metric) for task, values in original.items() for metric in values]
    head = "| model | " + " | ".join(f"{task} {metric}" for task, metric in metrics) + " |"
    rows = [head, "|---" * (1 + len(metrics)) + "|"]
    rows.append("| original | " + " | ".join(number(original[t][m], m) for t, m in metrics) + " |")
    for name, result in results.items():
        cells = []
        for task, metric in metrics:
            value, off, base = result[task][metric], window_alone[task][metric], original[task][metric]
            cells.append(number(value, metric) + ("" if result is window_alone else f" ({percent(share(value, off, base))})"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a LoLCATs (or LoLA) adapter folder with conversion.json")
    parser.add_argument("--slots", help="cache sizes to compare, comma-separated [the adapter's, else 256]")
    parser.add_argument("--horizon", type=int, help="LoLA's horizon: keys further back leave the cache [the adapter's, else 2048]")
    parser.add_argument("--window", type=int, default=4096, help="tokens per perplexity window")
    parser.add_argument("--windows", type=int, default=2, help="windows of WikiText-2 and of held-out text")
    parser.add_argument("--passkeys", type=int, default=24, help="passkey documents (6 depths a length, 512 first)")
    args = parser.parse_args()
    conversion_file = args.adapter / "conversion.json"
    if not conversion_file.is_file():
        parser.error(f"{conversion_file} not found: give an adapter folder with the conversion.json of its model")
    conversion = json.loads(conversion_file.read_text())
    if conversion.get("method") not in ("lolcats", "lola"):
        parser.error(f"{args.adapter} is a {conversion.get('method')} adapter: LoLA runs on a LoLCATs adapter")
    lola = conversion.get("options", {}) if conversion["method"] == "lola" else {}
    horizon = lola.get("horizon", 2048) if args.horizon is None else args.horizon
    try:
        slots = [int(n) for n in (args.slots or str(lola.get("slots", 256))).split(",")]
    except ValueError:
        parser.error(f"--slots {args.slots}: give whole numbers, e.g. --slots 64,256")
    if not SHARED_DATA.is_dir():
        parser.error(f"{SHARED_DATA} not found: the bench reads WikiText-2 and general text from there")
    weights = hashlib.sha256((args.adapter / ADAPTER_FILE).read_bytes()).hexdigest()[:12]  # the adapter, wherever it lies
    options = {"tasks": LONG_TASKS, "window": args.window, "data_dir": SHARED_DATA,
               "task_limits": {"wikitext2": args.windows, "gentext": args.windows, "passkey": args.passkeys}}
    cache_file, suffix = RESULTS / "lola_evals.json", f"|{args.window}x{args.windows}|passkey={args.passkeys}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    original = cached_evaluation(cache_file, "original" + suffix, bundled_model("none"), None, options)
    results = {}
    for name, folder, use_state in models(conversion, slots, horizon):
        key = f"{folder.name}|adapter {weights}|state={use_state}{suffix}"
        results[name] = cached_evaluation(cache_file, key, folder, args.adapter, options, use_state)
    report = (f"# LoLA on {args.adapter.name} (SmolLM2-135M-Instruct; windows of {args.window} tokens, {args.windows} of "
              f"WikiText-2 and of held-out general text; passkey)\n\n" + table(original, results, results["window alone"])
              + "\n\nIn brackets: the share of the window-alone model's gap to the original that the row closes "
              "(the state's share for LoLCATs; the state's and the cache's for LoLA).\n")
    print(report)
    (RESULTS / "lola.md").write_text(report)
    panels = [{"x": "position in the window", "y": f"{task} perplexity", "logy": True,
               "series": {name: ([b.split("@")[1] for b in BUCKETS], [r[task][b] for b in BUCKETS])
                          for name, r in {"original": original, **results}.items()}}
              for task in ("wikitext2", "gentext")]
    line_plot(RESULTS / "lola.png", panels, title="Beyond the window: LoLA's cache, LoLCATs' state, the window alone")
    path = write_json("lola", {"original": original, "models": results, "conversion": conversion, "arguments": {
        **vars(args), "adapter": str(args.adapter)}})
    print(f"wrote {path}, {RESULTS / 'lola.md'}, {RESULTS / 'lola.png'}")


if __name__ == "__main__":
    main()

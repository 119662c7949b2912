"""Prefill and decode speed and peak memory against context length: the converted SmolLM2
(Liger-GLA) and the original transformer, both run by mlx-lm's generate_step, in one run.

    python bench/decode.py                      # contexts 1k, 4k, 16k, 32k
    python bench/decode.py --quick              # 256 and 1k tokens, a minute or two
    python bench/decode.py --contexts 2048,8192 --budget 600

Every context is prefilled first (timed, with its peak memory); decode is then timed in
rounds over all contexts of both models, so the load of other jobs on a shared CPU falls on
all alike. The original's prefill grows quadratically: a context it is predicted (or found)
to need more than --budget seconds for is skipped, with larger ones, and the output says so.
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_json  # noqa: E402  (loads the BLAS before mlx)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import mlx_linear  # noqa: E402
from mlx_linear.chat.session import PREFILL_STEP  # noqa: E402
from mlx_linear.convert import bundled_model  # noqa: E402
from mlx_linear.plot import line_plot  # noqa: E402
from mlx_linear.progress import Progress  # noqa: E402

MODELS = {"liger-gla": "converted (Liger-GLA)", "none": "original (mlx-lm)"}
# Prefill step: the chat's for the converted model, mlx-lm's default for the original.
PREFILL_STEPS = {"liger-gla": PREFILL_STEP, "none": 2048}
GOAL_FLAT = 0.10  # decode speed and peak memory within 10% of the smallest context's
GOAL_DECODE, GOAL_PREFILL, GOAL_CONTEXT = 3.0, 5.0, 16384
ROUNDS = 16  # decode rounds over all contexts and models


class OverBudget(Exception):
    pass


def prefill(model, context, budget, desc, prefill_step, steps_after):
    """Prefill `context` random tokens. Returns the result and mlx-lm's generator, paused after
    the first token with `steps_after` more to come, for the decode rounds."""
    vocab = model.model.embed_tokens.weight.shape[0]
    prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(context))
    cache = make_prompt_cache(model)
    mx.clear_cache()
    held = mx.get_active_memory()  # weights and the caches kept for decoding
    mx.reset_peak_memory()
    progress = Progress(context, "tok", desc)

    def on_prefill(done, total):
        progress.update(done - progress.done)
        if time.perf_counter() - start > budget and done < total:
            raise OverBudget(f"prefill passed the {budget:.0f} s budget after {done} of {total} tokens")

    start = time.perf_counter()
    steps = generate_step(
        prompt,
        model,
        max_tokens=steps_after + 1,
        prompt_cache=cache,
        prefill_step_size=prefill_step,
        prompt_progress_callback=on_prefill,
    )
    next(steps)
    seconds = time.perf_counter() - start
    progress.close()
    result = {
        "context": context,
        "prefill_s": seconds,
        "prefill_tps": context / seconds,
        "peak_memory_mb": (mx.get_peak_memory() - held) / 1e6,  # plus the weights: see run_prefills
        "cache_mb": sum(c.nbytes for c in cache) / 1e6,
    }
    return result, steps


def predicted_seconds(results, context):
    """Extrapolate the last two prefill times as a power of the context."""
    if len(results) < 2:
        return 0.0
    (a, ta), (b, tb) = ((r["context"], r["prefill_s"]) for r in results[-2:])
    power = max(1.0, math.log(tb / ta) / math.log(b / a))
    return tb * (context / b) ** power


def run_prefills(method, contexts, steps_after, budget):
    """Prefill every context in turn; (the model's summary, [(result, paused generator)])."""
    model, _ = mlx_linear.load(bundled_model(method, log=lambda m: print(m, file=sys.stderr)))
    weights_mb = sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e6
    step = PREFILL_STEPS[method]
    _, warm_up = prefill(model, 128, budget, f"{method} warm-up", step, 4)
    for _ in warm_up:
        pass
    runs, stopped = [], None
    for context in contexts:
        guess = predicted_seconds([r for r, _ in runs], context)
        if guess > budget:
            stopped = f"stopped before {context} tokens: prefill predicted to take {guess:.0f} s > budget {budget:.0f} s"
            break
        try:
            result, steps = prefill(model, context, budget, f"{method} {context}", step, steps_after)
        except OverBudget as e:
            stopped = f"stopped at {context} tokens: {e}"
            break
        result["peak_memory_mb"] += weights_mb
        runs.append((result, steps))
        print(f"{MODELS[method]:24s} {context:6d} tok | prefill {result['prefill_tps']:7.1f} tok/s", flush=True)
    if stopped:
        print(f"{MODELS[method]}: {stopped}", flush=True)
        mx.clear_cache()
    return {"name": MODELS[method], "prefill_step": step, "weights_mb": weights_mb, "stopped": stopped}, runs


def decode_rounds(runs, decode_tokens, rounds):
    """Decode every paused generator in turn, `rounds` times: other jobs' load on this shared
    CPU then falls on every context and model alike. Seconds per step, per run."""
    times = [[] for _ in runs]
    for _ in range(rounds):
        for (_, steps), seconds in zip(runs, times):
            next(steps)  # settles the step the previous generator left in flight; not timed
            last = time.perf_counter()
            for _ in range(decode_tokens // rounds):
                next(steps)
                now = time.perf_counter()
                seconds.append(now - last)
                last = now
    return times


def flat(results, key):
    values = [r[key] for r in results]
    spread = max(abs(v / values[0] - 1) for v in values) if values else None
    return {"values": values, "max_deviation": spread, "met": spread is not None and spread <= GOAL_FLAT}


def ratio_at(models, context, key, goal):
    by_context = [{r["context"]: r[key] for r in models[m]["results"]} for m in ("liger-gla", "none")]
    if not all(context in b for b in by_context):
        return {"ratio": None, "goal": goal, "met": None, "note": f"not measured at {context} tokens for both models"}
    ratio = by_context[0][context] / by_context[1][context]
    return {"ratio": ratio, "goal": goal, "met": ratio >= goal}


def goals(models):
    liger = models["liger-gla"]["results"]
    return {
        "converted_decode_flat": flat(liger, "decode_tps"),
        "converted_peak_memory_flat": flat(liger, "peak_memory_mb"),
        f"decode_{GOAL_DECODE:g}x_at_{GOAL_CONTEXT}": ratio_at(models, GOAL_CONTEXT, "decode_tps", GOAL_DECODE),
        f"prefill_{GOAL_PREFILL:g}x_at_{GOAL_CONTEXT}": ratio_at(models, GOAL_CONTEXT, "prefill_tps", GOAL_PREFILL),
    }


def plot(models, path):
    def series(key):
        return {
            info["name"]: ([r["context"] for r in info["results"]], [r[key] for r in info["results"]])
            for info in models.values()
        }

    panels = [
        {"x": "context (tokens)", "y": f"{label}", "series": series(key), "logx": True, "logy": logy}
        for key, label, logy in [
            ("prefill_tps", "prefill tokens/s", True),
            ("decode_tps", "decode tokens/s", True),
            ("peak_memory_mb", "peak memory (MB)", False),
        ]
    ]
    return line_plot(path, panels, "SmolLM2-135M, float32, CPU: converted vs original")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated token counts")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds one prefill may take")
    parser.add_argument("--quick", action="store_true", help="contexts 256,1024; 16 decode tokens")
    args = parser.parse_args()
    contexts = [256, 1024] if args.quick else sorted(int(c) for c in args.contexts.split(","))
    decode_tokens = 16 if args.quick else args.decode_tokens
    name = "decode-quick" if args.quick else "decode"
    load = os.getloadavg()
    models, runs = {}, []
    for method in MODELS:
        models[method], method_runs = run_prefills(method, contexts, decode_tokens + ROUNDS, args.budget)
        models[method]["results"] = [result for result, _ in method_runs]
        runs += method_runs
    for (result, _), seconds in zip(runs, decode_rounds(runs, decode_tokens, ROUNDS)):
        result["decode_tokens"] = len(seconds)
        result["decode_tps"] = 1 / statistics.median(seconds)
        result["decode_tps_best"] = 1 / min(seconds)
    for method, info in models.items():
        for r in info["results"]:
            print(
                f"{info['name']:24s} {r['context']:6d} tok | prefill {r['prefill_tps']:7.1f} tok/s | "
                f"decode {r['decode_tps']:6.2f} tok/s (best {r['decode_tps_best']:6.2f}) | "
                f"peak {r['peak_memory_mb']:6.0f} MB | cache {r['cache_mb']:6.1f} MB"
            )
    report = {
        "contexts": contexts,
        "decode_tokens": decode_tokens,
        "budget_s": args.budget,
        "load_average": {"start": load, "end": os.getloadavg()},  # other jobs on the CPU skew speeds
        "models": models,
        "goals": goals(models),
    }
    for goal, g in report["goals"].items():
        if "ratio" in g:
            value = "not measured" if g["ratio"] is None else f"{g['ratio']:.2f}x (goal {g['goal']:g}x)"
        else:
            value = f"max deviation {g['max_deviation']:.1%} (goal {GOAL_FLAT:.0%})" if g["values"] else "no data"
        print(f"goal {goal}: {value}: {'met' if g['met'] else 'NOT met' if g['met'] is False else '-'}")
    print(f"wrote {write_json(name, report)}")
    png = plot(models, RESULTS / f"{name}.png")
    print(f"wrote {png}" if png else "no plot: pip install matplotlib")


if __name__ == "__main__":
    main()

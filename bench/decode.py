"""Prefill and decode speed and peak memory against context length: the converted SmolLM2
(Liger-GLA) and the original transformer, both run by mlx-lm's generate_step, in one run.

    python bench/decode.py                      # contexts 1k, 4k, 16k, 32k
    python bench/decode.py --quick              # 256 and 1k tokens, a minute or two
    python bench/decode.py --contexts 2048,8192 --budget 600

The original's prefill grows quadratically: a context it is predicted (or found) to need more
than --budget seconds for is skipped, with larger ones, and the output says so.
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


class OverBudget(Exception):
    pass


def measure(model, context, decode_tokens, budget, desc, prefill_step):
    """Prefill `context` random tokens, then decode; seconds per phase and peak memory."""
    vocab = model.model.embed_tokens.weight.shape[0]
    prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(context))
    cache = make_prompt_cache(model)
    mx.clear_cache()
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
        max_tokens=decode_tokens + 1,
        prompt_cache=cache,
        prefill_step_size=prefill_step,
        prompt_progress_callback=on_prefill,
    )
    next(steps)
    prefill_s = time.perf_counter() - start
    progress.close()
    step_s, last = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
    return {
        "context": context,
        "prefill_s": prefill_s,
        "prefill_tps": context / prefill_s,
        "decode_tokens": len(step_s),
        "decode_tps": 1 / statistics.median(step_s),  # median: robust to other jobs on the CPU
        "decode_tps_mean": len(step_s) / sum(step_s),
        "peak_memory_mb": mx.get_peak_memory() / 1e6,
        "cache_mb": sum(c.nbytes for c in cache) / 1e6,
    }


def predicted_seconds(results, context):
    """Extrapolate the last two measurements' total time as a power of the context."""
    if len(results) < 2:
        return 0.0
    (a, ta), (b, tb) = ((r["context"], r["prefill_s"]) for r in results[-2:])
    power = max(1.0, math.log(tb / ta) / math.log(b / a))
    return tb * (context / b) ** power


def run_model(method, contexts, decode_tokens, budget):
    model, _ = mlx_linear.load(bundled_model(method, log=lambda m: print(m, file=sys.stderr)))
    weights_mb = sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e6
    step = PREFILL_STEPS[method]
    measure(model, 128, 4, budget, f"{method} warm-up", step)
    results, stopped = [], None
    for context in contexts:
        guess = predicted_seconds(results, context)
        if guess > budget:
            stopped = f"stopped before {context} tokens: prefill predicted to take {guess:.0f} s > budget {budget:.0f} s"
            break
        try:
            r = measure(model, context, decode_tokens, budget, f"{method} {context}", step)
        except OverBudget as e:
            stopped = f"stopped at {context} tokens: {e}"
            break
        results.append(r)
        print(
            f"{MODELS[method]:24s} {context:6d} tok | prefill {r['prefill_tps']:7.1f} tok/s | "
            f"decode {r['decode_tps']:6.2f} tok/s | peak {r['peak_memory_mb']:7.0f} MB | cache {r['cache_mb']:7.1f} MB",
            flush=True,
        )
    if stopped:
        print(f"{MODELS[method]}: {stopped}", flush=True)
    del model
    mx.clear_cache()
    return {"name": MODELS[method], "prefill_step": step, "weights_mb": weights_mb, "results": results, "stopped": stopped}


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
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds one prefill may take")
    parser.add_argument("--quick", action="store_true", help="contexts 256,1024; 8 decode tokens")
    args = parser.parse_args()
    contexts = [256, 1024] if args.quick else sorted(int(c) for c in args.contexts.split(","))
    decode_tokens = 8 if args.quick else args.decode_tokens
    name = "decode-quick" if args.quick else "decode"
    load = os.getloadavg()
    models = {m: run_model(m, contexts, decode_tokens, args.budget) for m in MODELS}
    result = {
        "contexts": contexts,
        "decode_tokens": decode_tokens,
        "budget_s": args.budget,
        "load_average": {"start": load, "end": os.getloadavg()},  # other jobs on the CPU skew speeds
        "models": models,
        "goals": goals(models),
    }
    for goal, g in result["goals"].items():
        if "ratio" in g:
            value = "not measured" if g["ratio"] is None else f"{g['ratio']:.2f}x (goal {g['goal']:g}x)"
        else:
            value = f"max deviation {g['max_deviation']:.1%} (goal {GOAL_FLAT:.0%})" if g["values"] else "no data"
        print(f"goal {goal}: {value}: {'met' if g['met'] else 'NOT met' if g['met'] is False else '-'}")
    print(f"wrote {write_json(name, result)}")
    png = plot(models, RESULTS / f"{name}.png")
    print(f"wrote {png}" if png else "no plot: pip install matplotlib")


if __name__ == "__main__":
    main()

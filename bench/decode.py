"""Prefill and decode speed against context length, as shares of the machine's bounds: the
converted SmolLM2 (as the chat runs it, with and without the compiled decode step, the paper's
recipe, 4-bit) and the original transformer, all run by mlx-lm's generate_step, in one run;
then batched decode in mlx-lm's batch caches (what mlx_lm.server and batch_generate run) at
batch 1, 4, 16, --batch-context tokens in.

    python bench/decode.py                                  # contexts 128, 1k, 4k: ~5 minutes
    python bench/decode.py --quick                          # 128 and 1k, fewer tokens
    python bench/decode.py --contexts 128,1024,4096,16384,32768 --budget 600
    python bench/decode.py --models chat,chat-4bit-kept     # see bench/models.py
    python bench/decode.py --contexts 128 --batches 1,16 --batch-context 16384   # batched, 16k in: ~15 minutes

Bounds, measured in the same run: decode reads every weight once a token, so its bound is
the weights' bytes / the read bandwidth of a BLAS matrix-vector product over 512 MB (timed
in every decode round); prefill's is the matrix FLOPs a token (2 x the layers' weights; the
LM head runs for the last token only) / a float32 2048^3 matmul's rate (timed before each
prefill). Every context is prefilled first (with its peak memory), the models in turn at each; decode
is then timed in rounds over all contexts of all models, so the load of other jobs on a
shared CPU falls on all alike. The original's prefill grows quadratically: a context it is predicted (or found)
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
from common import RESULTS, batch_of, decode_seconds, matmul_rate, prefilled, read_bandwidth, write_json  # noqa: E402  (BLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from models import DESCRIPTIONS, load_bench_model  # noqa: E402

from mlx_linear.chat.session import PREFILL_STEP  # noqa: E402
from mlx_linear.plot import line_plot  # noqa: E402
from mlx_linear.progress import Progress  # noqa: E402

DEFAULT_MODELS = "chat,chat-plain,paper,chat-4bit,none"
# Prefill step: the chat's for the converted models, mlx-lm's default for the original.
PREFILL_STEPS = {"none": 2048}
GOAL_BOUND_DECODE, GOAL_BOUND_PREFILL, GOAL_PREFILL_FROM = 0.60, 0.50, 4096
GOAL_VS_ORIGINAL, GOAL_VS_ORIGINAL_AT = 2.0, 1024
GOAL_4BIT = 0.95  # 4-bit no slower than float32, 5% allowed for noise
GOAL_FLAT, GOAL_FLAT_FROM = 0.10, 1024  # decode speed and peak memory from 1k on: within 10% of 1k's
GOAL_BATCH = 16


class OverBudget(Exception):
    pass


def weight_bytes(model):
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def prefill_flops(model):
    """Matrix FLOPs a prompt token: 2 per weight of the layers' linears (the LM head runs once)."""
    linears = [m for layer in model.layers for _, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return 2 * sum(m.weight.size * 32 // getattr(m, "bits", 32) for m in linears)


def prefill(model, context, budget, desc, prefill_step, steps_after):
    """Prefill `context` random tokens. Returns the result and mlx-lm's generator, paused after
    the first token with `steps_after` more to come, for the decode rounds."""
    vocab = model.model.embed_tokens.weight.shape[0]
    prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(context))
    cache = make_prompt_cache(model)
    matmul_flops = matmul_rate()
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
        "peak_memory_mb": (mx.get_peak_memory() - held) / 1e6,  # plus the weights: see prefill_context
        "prefill_bound_share": context * prefill_flops(model) / seconds / matmul_flops,
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


def model_info(name, model, budget):
    """The model's summary, after a warm-up prefill and decode."""
    step = PREFILL_STEPS.get(name, PREFILL_STEP)
    _, warm_up = prefill(model, 128, budget, f"{name} warm-up", step, 4)
    for _ in warm_up:
        pass
    return {"name": DESCRIPTIONS[name], "prefill_step": step, "weight_bytes": weight_bytes(model), "stopped": None, "results": []}


def prefill_context(info, model, context, steps_after, budget):
    """(result, paused generator), or None with info["stopped"] saying why (the budget)."""
    guess = predicted_seconds(info["results"], context)
    if guess > budget:
        info["stopped"] = f"stopped before {context} tokens: prefill predicted to take {guess:.0f} s > budget {budget:.0f} s"
        return None
    try:
        result, steps = prefill(model, context, budget, f"{info['name']} {context}", info["prefill_step"], steps_after)
    except OverBudget as e:
        info["stopped"] = f"stopped at {context} tokens: {e}"
        mx.clear_cache()
        return None
    result["peak_memory_mb"] += info["weight_bytes"] / 1e6
    info["results"].append(result)
    print(f"{info['name']:44s} {context:6d} tok | prefill {result['prefill_tps']:7.1f} tok/s", flush=True)
    return result, steps


def run_prefills(loaded, contexts, steps_after, budget):
    """Every context of every model, the models interleaved at each context (so that other
    jobs' load falls on all alike); ({name: summary}, [(result, paused generator, name)])."""
    models = {name: model_info(name, model, budget) for name, (model, _) in loaded.items()}
    runs = []
    for context in contexts:
        for name, (model, _) in loaded.items():
            if models[name]["stopped"] is None:
                run = prefill_context(models[name], model, context, steps_after, budget)
                runs += [(*run, name)] if run else []
    for info in models.values():
        if info["stopped"]:
            print(f"{info['name']}: {info['stopped']}", flush=True)
    return models, runs


def decode_rounds(runs, decode_tokens, rounds):
    """Decode every paused generator in turn, `rounds` times: other jobs' load on this shared
    CPU then falls on every context and model alike. (Seconds per step, per run; the read
    bandwidth measured in each round.)"""
    times, bandwidths = [[] for _ in runs], []
    for _ in range(rounds):
        bandwidths.append(read_bandwidth())
        for (_, steps), seconds in zip(runs, times):
            next(steps)  # settles the step the previous generator left in flight; not timed
            last = time.perf_counter()
            for _ in range(decode_tokens // rounds):
                next(steps)
                now = time.perf_counter()
                seconds.append(now - last)
                last = now
    return times, bandwidths


def batched_decode(models, batches, context, decode_tokens):
    """Tokens/s of `batch` sequences decoding together `context` tokens in, in mlx-lm's batch
    caches (what BatchGenerator and mlx_lm.server run): one prompt prefilled, its cache copied
    for every row (common.batch_of)."""
    results = {name: [] for name in models}
    for name, (model, _) in models.items():
        vocab = model.model.embed_tokens.weight.shape[0]
        tokens = mx.random.randint(0, vocab, (1, context), key=mx.random.key(context))
        cache, token, _ = prefilled(model, tokens, PREFILL_STEPS.get(name, PREFILL_STEP))
        for batch in batches:
            mx.clear_cache()
            mx.reset_peak_memory()
            seconds = decode_seconds(model, batch_of(cache, batch), mx.repeat(token, batch), decode_tokens)
            results[name].append({"batch": batch, "decode_tps": batch / seconds, "peak_memory_mb": mx.get_peak_memory() / 1e6})
            print(f"{DESCRIPTIONS[name]:44s} batch {batch:3d} at {context} | decode {batch / seconds:7.1f} tok/s", flush=True)
    return results


def by_context(models, name, key):
    return {r["context"]: r[key] for r in models[name]["results"]} if name in models else {}


def ratio_goal(numerator, denominator, goal):
    common = sorted(set(numerator) & set(denominator))
    ratios = {c: numerator[c] / denominator[c] for c in common}
    return {"ratios": ratios, "goal": goal, "met": bool(ratios) and min(ratios.values()) >= goal}


def share_goal(values, goal):
    return {"shares": values, "goal": goal, "met": bool(values) and min(values.values()) >= goal}


def flat_goal(values):
    """Deviations from the value at the smallest context from GOAL_FLAT_FROM (a shorter prompt
    is prefilled in one smaller step, so its peak memory is lower)."""
    values = {c: v for c, v in values.items() if c >= GOAL_FLAT_FROM}
    first = values[min(values)] if values else None
    deviations = {c: abs(v / first - 1) for c, v in values.items()}
    return {"deviations": deviations, "goal": GOAL_FLAT, "met": bool(values) and max(deviations.values()) <= GOAL_FLAT}


def goals(models):
    """The goals, for every converted model measured (ratios within this run)."""
    report = {}
    for name in models:
        if name == "none":
            continue
        for key in ("decode_tps", "peak_memory_mb"):
            report[f"{name}: {key} flat within {GOAL_FLAT:.0%} from {GOAL_FLAT_FROM}"] = flat_goal(by_context(models, name, key))
        shares = by_context(models, name, "decode_bound_share")
        report[f"{name}: decode >= {GOAL_BOUND_DECODE:.0%} of the bandwidth bound"] = share_goal(shares, GOAL_BOUND_DECODE)
        prefill = {c: v for c, v in by_context(models, name, "prefill_bound_share").items() if c >= GOAL_PREFILL_FROM}
        goal = f"{name}: prefill >= {GOAL_BOUND_PREFILL:.0%} of the matmul bound from {GOAL_PREFILL_FROM}"
        report[goal] = share_goal(prefill, GOAL_BOUND_PREFILL)
        original = {c: v for c, v in by_context(models, "none", "decode_tps").items() if c == GOAL_VS_ORIGINAL_AT}
        report[f"{name}: decode >= {GOAL_VS_ORIGINAL:g}x the original's at {GOAL_VS_ORIGINAL_AT}"] = ratio_goal(
            by_context(models, name, "decode_tps"), original, GOAL_VS_ORIGINAL)
    for quantized in ("chat-4bit", "chat-4bit-kept"):
        for key in ("decode_tps", "prefill_tps"):
            if quantized in models and "chat" in models:
                report[f"{quantized}: {key.split('_')[0]} >= {GOAL_4BIT:g}x float32's"] = ratio_goal(
                    by_context(models, quantized, key), by_context(models, "chat", key), GOAL_4BIT)
    return report


def batch_goals(batched, context):
    """Each converted model's batch-16 decode at least the original's (a constant-size cache per
    sequence against a growing one: the issue's goal is at a 16k context)."""
    by_batch = {name: {r["batch"]: r["decode_tps"] for r in rows if r["batch"] == GOAL_BATCH} for name, rows in batched.items()}
    return {f"{name}: batch {GOAL_BATCH} decode >= the original's at {context}": ratio_goal(tps, by_batch["none"], 1.0)
            for name, tps in by_batch.items() if name != "none" and "none" in by_batch}


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
            ("decode_bound_share", "decode / bandwidth bound", False),
        ]
    ]
    return line_plot(path, panels, "SmolLM2-135M, CPU: converted vs original")


def print_tables(models, batched):
    print(f"\n{'model':44s} {'context':>7s} | {'prefill tok/s':>13s} {'of bound':>8s} | "
          f"{'decode tok/s':>12s} {'of bound':>8s} | {'peak MB':>7s}")
    for info in models.values():
        for r in info["results"]:
            print(f"{info['name']:44s} {r['context']:7d} | {r['prefill_tps']:13.1f} {r['prefill_bound_share']:8.1%} | "
                  f"{r['decode_tps']:12.2f} {r['decode_bound_share']:8.1%} | {r['peak_memory_mb']:7.0f}")
    for name, rows in batched.items():
        line = ", ".join(f"batch {r['batch']}: {r['decode_tps']:.1f}" for r in rows)
        print(f"{DESCRIPTIONS[name]:44s} batched decode tok/s: {line}")


def print_goals(report):
    for goal, g in report.items():
        values = g.get("shares") or g.get("ratios") or g.get("deviations") or {}
        shown = ", ".join(f"{c}: {v:.2f}" for c, v in values.items()) or "not measured"
        print(f"goal {goal}: {shown}: {'met' if g['met'] else 'NOT met'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {', '.join(DESCRIPTIONS)}")
    parser.add_argument("--contexts", default="128,1024,4096", help="comma-separated token counts")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="decode rounds over all contexts and models")
    parser.add_argument("--batches", default="1,4,16", help="batched decode sizes ('' for none)")
    parser.add_argument("--batch-models", default="chat,paper,none")
    parser.add_argument("--batch-context", type=int, default=1024, help="the issue's goal: 16384 (the original's 16 prefills: ~10 minutes)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds one prefill may take")
    parser.add_argument("--quick", action="store_true", help="contexts 128,1024; 16 decode tokens; batches 1,4")
    args = parser.parse_args()
    contexts = [128, 1024] if args.quick else sorted(int(c) for c in args.contexts.split(","))
    decode_tokens = 16 if args.quick else args.decode_tokens
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",") if b]
    load = os.getloadavg()
    loaded = {name: load_bench_model(name) for name in args.models.split(",")}
    models, runs = run_prefills(loaded, contexts, decode_tokens + args.rounds, args.budget)
    seconds, bandwidths = decode_rounds([(r, s) for r, s, _ in runs], decode_tokens, args.rounds)
    bandwidth = statistics.median(bandwidths)
    for (result, _, name), times in zip(runs, seconds):
        result["decode_tokens"] = len(times)
        result["decode_tps"] = 1 / statistics.median(times)
        result["decode_tps_best"] = 1 / min(times)
        result["decode_bound_share"] = result["decode_tps"] * models[name]["weight_bytes"] / bandwidth
    batch_models = {n: loaded[n] for n in args.batch_models.split(",") if n in loaded}
    batched = batched_decode(batch_models, batches, args.batch_context, decode_tokens) if batches else {}
    print_tables(models, batched)
    report = {
        "contexts": contexts,
        "decode_tokens": decode_tokens,
        "budget_s": args.budget,
        "read_bandwidth_gb_s": {"median": bandwidth / 1e9, "rounds": [b / 1e9 for b in bandwidths]},
        "load_average": {"start": load, "end": os.getloadavg()},  # other jobs on the CPU skew speeds
        "models": models,
        "batched": {"context": args.batch_context, "decode_tokens": decode_tokens, "models": batched},
        "goals": {**goals(models), **batch_goals(batched, args.batch_context)},
    }
    print(f"read bandwidth (BLAS matrix-vector, 512 MB): {bandwidth / 1e9:.1f} GB/s")
    print_goals(report["goals"])
    name = "decode-quick" if args.quick else "decode"
    print(f"wrote {write_json(name, report)}")
    png = plot(models, RESULTS / f"{name}.png")
    print(f"wrote {png}" if png else "no plot: pip install matplotlib")


if __name__ == "__main__":
    main()

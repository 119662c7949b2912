"""Where a decode token's time goes: each op family of the plain step timed alone, over all
layers, beside the whole step, plain and compiled (mlx_linear/decode.py). With --prefill N,
where a prefill step of N tokens goes (the chat prefills in steps of 512).

    python bench/decode_profile.py                  # the chat's default model, 256-token context
    python bench/decode_profile.py --model paper    # the paper's Liger-GLA recipe
    python bench/decode_profile.py --prefill 512    # one prefill step after the context
    python bench/decode_profile.py --kernels        # kernels a decode step, every model and the original
    python bench/decode_profile.py --kernels --prefill 2048   # kernels a token of a 2,048-token prefill step

Each family runs the model's own modules on one token's inputs for every layer, as one graph
evaluated per token; families and the whole step are timed in interleaved rounds, so other
jobs' load falls on all alike. The step's time beyond the families' sum is graph building,
scheduling and Python. LoLA's block boundaries (every 64 tokens) are timed apart: the mean of a
block's steps against that of the steps between boundaries.

Kernels (--kernels): at one token a step a GPU is bound by kernel launches, so the device-free
measure is the primitives in one decode step's graph (mx.export_to_dot), views excluded, the
mean over 64 steps after a 1,024-token prompt. On the CPU MLX's fast RoPE, RMSNorm and attention
run as their fallback ops (counted), where a GPU runs each as one kernel. The models with fused
step kernels (mlx_linear/step_kernels.py) are counted a second time as a GPU runs them: the
kernel stood in by one node of its inputs and outputs.
"""

import argparse
import collections
from contextlib import contextmanager, nullcontext
import os
import re
import statistics
import tempfile
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import matmul_rate, median_seconds, write_json  # noqa: E402  (loads the BLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from decode import prefill_flops  # noqa: E402
from mlx_linear import step_kernels  # noqa: E402
from mlx_linear.attention import Rope  # noqa: E402
from models import DESCRIPTIONS, load_bench_model  # noqa: E402


def prefilled(model, context):
    cache = make_prompt_cache(model)
    vocab = model.model.embed_tokens.weight.shape[0]
    logits = model(mx.random.randint(0, vocab, (1, context), key=mx.random.key(0)), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, mx.argmax(logits[:, -1], axis=-1)


VIEWS = {"Reshape", "Transpose", "Broadcast", "Slice", "ExpandDims", "Squeeze", "AsStrided", "Flatten", "Unflatten",
         "StopGradient", "CustomTransforms"}  # views, and no-ops that share their input's buffer


def primitives(outputs):
    """{primitive: count} of the graph that computes `outputs`, views excluded."""
    arrays = [x for _, x in tree_flatten(outputs) if isinstance(x, mx.array)]
    handle, path = tempfile.mkstemp(suffix=".dot")
    os.close(handle)
    try:
        mx.export_to_dot(path, *arrays)
        labels = re.findall(r'\[label ="([^"]+)", shape=rectangle\]', Path(path).read_text())
    finally:
        os.remove(path)
    return collections.Counter(label for label in labels if label not in VIEWS)


def decode_steps(model, cache, token, steps):
    """Yield, for `steps` greedy decode steps, (step's logits, the graph's outputs) before evaluating them."""
    for _ in range(steps):
        logits = model(token[None], cache=cache)
        outputs = [logits, [c.state for c in cache]]
        yield logits, outputs
        mx.eval(outputs)
        token = mx.argmax(logits[:, -1], axis=-1)


def kernel_count(model, context=1024, steps=64, prefill=0):
    """The mean primitives a decode step, in all and by family, after a `context`-token prompt;
    with `prefill`, those of one prefill step of that many tokens after it, a token."""
    cache, token = prefilled(model, context)
    total = collections.Counter()
    if prefill:
        tokens = mx.random.randint(0, model.model.embed_tokens.weight.shape[0], (1, prefill))
        mx.eval(tokens)
        total, steps = primitives([model(tokens, cache=cache)[:, -1], [c.state for c in cache]]), prefill
    for _, outputs in decode_steps(model, cache, token, 0 if prefill else steps):
        total += primitives(outputs)
    return sum(total.values()) / steps, {name: n / steps for name, n in total.most_common()}


def stand_in_kernel(**spec):
    """A fused kernel that computes nothing: one graph node (Depends) whose parents are the
    launch's inputs and whose outputs have its shapes. It counts the GPU path's kernels here."""
    def launch(*, inputs, output_shapes, output_dtypes, **_):
        outputs = [mx.array(np.zeros(shape), dtype) for shape, dtype in zip(output_shapes, output_dtypes)]  # constants
        return mx.depends(outputs, list(inputs))
    return launch


@contextmanager
def fused_step_kernels():
    """The decode step as on a GPU: each layer's attention one (stood-in) fused kernel."""
    stock, kernels = step_kernels.ready, step_kernels.make_step_kernels(stand_in_kernel)
    step_kernels.ready = kernels.get
    try:
        yield
    finally:
        step_kernels.ready = stock


FUSED = ("chat", "paper")  # the models with fused kernels (decode; LoLA's block boundary in prefill)


def kernels_report(names, context, prefill=0):
    rows = {}
    for name in names:
        model, _ = load_bench_model(name)
        for fused in (False, True) if name in FUSED else (False,):
            with fused_step_kernels() if fused else nullcontext():
                model._decode_steps = {}  # traced anew
                per_step, by_family = kernel_count(model, context, prefill=prefill)
            label = name + (" fused" if fused else "")
            rows[label] = {"model": DESCRIPTIONS[name] + (", fused kernels (GPU)" if fused else ""), "per_step": per_step,
                           "per_layer": per_step / len(model.layers), "families": by_family}
        del model
    original = rows.get("none", {}).get("per_step")
    for row in rows.values():
        row["vs_original"] = row["per_step"] / original if original else None
        share = f"{row['vs_original']:5.2f}x the original's" if original else ""
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(row["families"].items())[:5])
        unit = "a prefill token" if prefill else "a step"
        print(f"{row['model']:62s} {row['per_step']:7.1f} {unit} ({row['per_layer']:5.2f} a layer) {share} | {top}")
    return rows


def boundary_cost(model, cache, token, blocks=2):
    """LoLA-style methods choose their cache every `window` tokens: ms of the mean whole step
    (model call, evaluation, next token) over whole blocks, against that between boundaries and at them."""
    window, offset = model.layers[0].self_attn.window, cache[0].caches[1].offset
    skip = -offset % window + window  # a block to settle in, then whole blocks from a boundary
    times = {"at a boundary": [], "between boundaries": []}
    for i in range(skip + blocks * window):
        start = time.perf_counter()
        token = mx.argmax(model(token[None], cache=cache)[:, -1], axis=-1)
        mx.eval(token, [c.state for c in cache])
        if i >= skip:
            times["at a boundary" if (offset + i) % window == 0 else "between boundaries"].append(time.perf_counter() - start)
    ms = {kind: statistics.mean(t) * 1e3 for kind, t in times.items()}
    ms["a block's mean step"] = statistics.mean(times["at a boundary"] + times["between boundaries"]) * 1e3
    return ms


def families(model, cache, tokens):
    """{family: a function building the graph of that family over every layer} for `tokens`
    (1, L): one decode token, or a prefill step (whose window reads the cache's keys beside its own)."""
    x = model.model.embed_tokens(tokens)
    prefill = tokens.shape[1] > 1
    mx.eval(x)
    layers = [(layer, layer.self_attn, *c.caches) for layer, c in zip(model.layers, cache)]
    qkv = [tuple(a.project(x)) for _, a, _, _ in layers]
    mx.eval(qkv)

    def rope_at(attention, window_cache):
        return Rope(attention.rope, window_cache.offset, attention.rotary)

    def window(a, w, q, k, v):
        rotated, keys, values = a.rope(q, offset=w.offset), w.keys, w.values
        if prefill:  # the cache's keys, then the step's own (timing only: ring order is kept)
            keys = mx.concatenate([keys, a.rope(k, offset=w.offset)], axis=2)
            values = mx.concatenate([values, v], axis=2)
        return a.window_attention(rotated, keys, values, w.offset, a.sink_queries(q, rotated, w.offset, rope_at(a, w)))[0]

    def cache_update(w, k, v):
        keys, values = w.update_and_fetch(k, v)
        w.offset -= 1  # the profile writes the same slot each token
        w._idx -= 1
        return keys, values

    parts = {
        "q/k/v projections": lambda: [list(a.project(x)) for _, a, _, _ in layers],
        "o projection": lambda: [a.o_proj(x) for _, a, _, _ in layers],
        "MLP": lambda: [layer.mlp(x) for layer, *_ in layers],
        "norms": lambda: [(layer.input_layernorm(x), layer.post_attention_layernorm(x)) for layer, *_ in layers],
        "scan step (features, state, readout)": lambda: [
            a.method(q, k, v, rope_at(a, w), s.cache)[0] for (_, a, s, w), (q, k, v) in zip(layers, qkv)],
        "RoPE and window attention": lambda: [window(a, w, q, k, v) for (_, a, _, w), (q, k, v) in zip(layers, qkv)],
        "window cache update": lambda: [cache_update(w, k, v) for (_, _, _, w), (_, k, v) in zip(layers, qkv)],
        "embedding and LM head": lambda: model.lm_head(x) if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear(x),
    }
    if prefill:  # a prefill step's logits are never evaluated, and its cache update is a copy
        del parts["embedding and LM head"], parts["window cache update"]
    return parts


def whole_step(model, cache, tokens):
    """One step as mlx-lm runs it: decode, the model, greedy sampling and the token read back;
    prefill, the model with the caches evaluated (its logits are not)."""
    logits = model(tokens, cache=cache)
    if tokens.shape[1] > 1:
        return mx.eval([c.state for c in cache])
    return mx.argmax(logits[:, -1], axis=-1).item()


def timed(build):
    start = time.perf_counter()
    out = build()
    mx.eval(out)
    return time.perf_counter() - start


def profile(model, cache, tokens, rounds):
    parts = families(model, cache, tokens)
    steps = ((False, "whole step"),) + (((True, "whole step, compiled"),) if tokens.shape[1] == 1 else ())
    times = {name: [] for name in [*parts, "graph building only", *(name for _, name in steps)]}
    for _ in range(rounds):
        for name, build in parts.items():
            times[name].append(timed(build))
        model.compile_decode = False
        start = time.perf_counter()
        graph = model(tokens, cache=cache)
        times["graph building only"].append(time.perf_counter() - start)
        mx.eval(graph)
        for compiled, name in steps:
            model.compile_decode = compiled
            start = time.perf_counter()
            whole_step(model, cache, tokens)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def elementwise_rates(elements, repeats=9):
    """Million elements a second of MLX's CPU ops on float32 of this size: the transcendentals
    (softmaxes, gates, decays) against a multiply."""
    x = mx.random.normal((elements,))
    mx.eval(x)
    ops = {"exp": mx.exp, "power(2, x)": lambda t: mx.power(2.0, t), "multiply": lambda t: t * t}
    return {name: elements / median_seconds(lambda: mx.eval(op(x)), repeats) / 1e6 for name, op in ops.items()}


def prefill_rates(model, ms, tokens):
    """The step's FLOP rate, and that of its projections and MLP alone, against a 2048^3
    matmul's (the prefill bound); the elementwise rates beside them."""
    bound, flops = matmul_rate(), prefill_flops(model) * tokens
    linears_ms = ms["q/k/v projections"] + ms["o projection"] + ms["MLP"]
    rates = {"whole step": flops / ms["whole step"] / 1e6, "projections and MLP alone": flops / linears_ms / 1e6}
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f} GFLOP/s, {rate * 1e9 / bound:.0%} of a 2048^3 matmul's {bound / 1e9:,.0f}")
    elementwise = elementwise_rates(tokens * model.layers[0].self_attn.n_heads * 128)
    print("MLX CPU elementwise, M elements/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in elementwise.items()))
    return {"gflops": rates, "matmul_gflops": bound / 1e9, "elementwise_m_per_s": elementwise}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="chat", choices=[m for m in DESCRIPTIONS if m != "none"])
    parser.add_argument("--context", type=int, help="tokens before the profiled step (256; --kernels: 1024)")
    parser.add_argument("--prefill", type=int, default=0, help="profile a prefill step of N tokens instead")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kernels", action="store_true", help="kernels a decode step, of every model and the original")
    args = parser.parse_args()
    if args.kernels:
        context = args.context or 1024
        rows = kernels_report(list(DESCRIPTIONS), context, args.prefill)
        name = f"prefill_kernels_{args.prefill}" if args.prefill else "decode_kernels"
        print(f"wrote {write_json(name, {'context': context, 'prefill': args.prefill, 'models': rows})}")
        return
    args.context = args.context or 256
    model, _ = load_bench_model(args.model)
    cache, token = prefilled(model, args.context)
    tokens = mx.random.randint(0, model.model.embed_tokens.weight.shape[0], (1, args.prefill)) if args.prefill else token[None]
    whole_step(model, cache, tokens)  # traces the compiled step
    ms = profile(model, cache, tokens, args.rounds)
    parts = sum(v for k, v in ms.items() if not k.startswith(("graph building", "whole step")))
    ms["whole step beyond the families (scheduling, Python)"] = ms["whole step"] - parts
    unit = f"ms a step of {args.prefill}" if args.prefill else "ms a token"
    for name, value in ms.items():
        print(f"{name:52s} {value:8.2f} {unit}  {value / ms['whole step']:6.1%}")
    report = {"model": DESCRIPTIONS[args.model], "context": args.context, "tokens": tokens.shape[1], "ms": ms}
    if args.prefill:
        report.update(prefill_rates(model, ms, args.prefill))
    else:
        report["boundaries_ms"] = boundary_cost(model, cache, token)
        for name, value in report["boundaries_ms"].items():
            print(f"{'LoLA block: step ' + name:52s} {value:8.2f} ms")
    name = f"prefill_profile_{args.model}" if args.prefill else f"decode_profile_{args.model}"
    print(f"wrote {write_json(name, report)}")


if __name__ == "__main__":
    main()

"""Where a decode token's time goes: each op family of the plain step timed alone, over all
layers, beside the whole step, plain and compiled (mlx_linear/decode.py).

    python bench/decode_profile.py                  # the chat's default model, 256-token context
    python bench/decode_profile.py --model paper    # the paper's Liger-GLA recipe

Each family runs the model's own modules on one token's inputs for every layer, as one graph
evaluated per token; families and the whole step are timed in interleaved rounds, so other
jobs' load falls on all alike. The step's time beyond the families' sum is graph building,
scheduling and Python.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402  (loads the BLAS before mlx)

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from models import DESCRIPTIONS, load_bench_model  # noqa: E402


def prefilled(model, context):
    cache = make_prompt_cache(model)
    vocab = model.model.embed_tokens.weight.shape[0]
    logits = model(mx.random.randint(0, vocab, (1, context), key=mx.random.key(0)), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, mx.argmax(logits[:, -1], axis=-1)


def families(model, cache, token):
    """{family: a function building one token's graph of that family over every layer}."""
    x = model.model.embed_tokens(token[None])
    mx.eval(x)
    layers = [(layer, layer.self_attn, *c.caches) for layer, c in zip(model.layers, cache)]
    qkv = [tuple(a.project(x)) for _, a, _, _ in layers]
    mx.eval(qkv)

    def rope_at(attention, window_cache):
        return lambda t: attention.rope(t, offset=window_cache.offset)

    def window_inputs(a, window_cache, q, k):
        rotated, keys = a.rope(q, offset=window_cache.offset), window_cache.keys
        return rotated, keys, a.sink_queries(q, rotated, window_cache.offset)

    def window(a, w, q, k, v):
        rotated, keys, sink_q = window_inputs(a, w, q, k)
        return a.window_attention(rotated, keys, w.values, w.offset, sink_q)[0]

    def cache_update(w, k, v):
        keys, values = w.update_and_fetch(k, v)
        w.offset -= 1  # the profile writes the same slot each token
        w._idx -= 1
        return keys, values

    return {
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


def whole_step(model, cache, token):
    """One decode step as mlx-lm runs it: the model, greedy sampling, the token read back."""
    logits = model(token[None], cache=cache)
    return mx.argmax(logits[:, -1], axis=-1).item()


def timed(build):
    start = time.perf_counter()
    out = build()
    mx.eval(out)
    return time.perf_counter() - start


def profile(model, cache, token, rounds):
    parts = families(model, cache, token)
    times = {name: [] for name in [*parts, "graph building only", "whole step", "whole step, compiled"]}
    for _ in range(rounds):
        for name, build in parts.items():
            times[name].append(timed(build))
        model.compile_decode = False
        start = time.perf_counter()
        graph = model(token[None], cache=cache)
        times["graph building only"].append(time.perf_counter() - start)
        mx.eval(graph)
        for compiled, name in ((False, "whole step"), (True, "whole step, compiled")):
            model.compile_decode = compiled
            start = time.perf_counter()
            whole_step(model, cache, token)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="chat", choices=[m for m in DESCRIPTIONS if m != "none"])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    model, _ = load_bench_model(args.model)
    cache, token = prefilled(model, args.context)
    whole_step(model, cache, token)  # traces the compiled step
    ms = profile(model, cache, token, args.rounds)
    parts = sum(v for k, v in ms.items() if not k.startswith(("graph building", "whole step")))
    ms["whole step beyond the families (scheduling, Python)"] = ms["whole step"] - parts
    for name, value in ms.items():
        print(f"{name:52s} {value:7.2f} ms  {value / ms['whole step']:6.1%}")
    report = {"model": DESCRIPTIONS[args.model], "context": args.context, "ms_per_token": ms}
    print(f"wrote {write_json(f'decode_profile_{args.model}', report)}")


if __name__ == "__main__":
    main()

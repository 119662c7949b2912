"""Does the model hold up far past its training length? A long WikiText-2 stream is prefilled
in chunks into one constant-size cache; every 2k-token block's perplexity is compared with the
same block read from a fresh cache (goal: within 10% at every block, to 100k tokens).

    python bench/long_context.py                            # the chat's model, 32k tokens
    python bench/long_context.py --tokens 100000
    python bench/long_context.py --model smol-liger --adapter my-adapter --state-off

Also prints the largest value in the recurrent state and the original transformer's perplexity
on the first blocks (mlx-lm, up to --original-tokens, its trained context is 8k), in the same run.
Writes bench/results/long_context.json and long_context.png.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_json  # noqa: E402  (loads the BLAS before mlx)

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import mlx_linear  # noqa: E402
from mlx_linear.chat.model import load_chat_model  # noqa: E402
from mlx_linear.convert import bundled_model  # noqa: E402
from mlx_linear.plot import line_plot  # noqa: E402
from mlx_linear.progress import Progress  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "wiki.test.raw.lf.txt"
GOAL = 0.10


def block_nlls(model, tokens, chunk, desc):
    """Per-token NLL of tokens[1:], read in `chunk`-token steps through one cache; and the cache."""
    cache, nlls = make_prompt_cache(model), []
    progress = Progress(len(tokens) - 1, "tok", desc)
    for start in range(0, len(tokens) - 1, chunk):
        inputs = mx.array(tokens[start : min(start + chunk, len(tokens) - 1)])[None]
        targets = mx.array(tokens[start + 1 : start + 1 + inputs.shape[1]])
        logits = model(inputs, cache=cache)[0].astype(mx.float32)
        nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        mx.eval(nll, [c.state for c in cache])
        nlls += nll.tolist()
        progress.update(inputs.shape[1])
    progress.close()
    return nlls, cache


def per_block(nlls, block):
    return [math.exp(sum(nlls[i : i + block]) / len(nlls[i : i + block])) for i in range(0, len(nlls), block)]


def state_peak(cache):
    """The largest |value| in any linearized layer's recurrent state: the first of its state's
    arrays (the scan's; the others are buffers, or LoLA's cache and its positions)."""
    values = [mx.abs(c.caches[0].cache[0]).max().item() for c in cache if hasattr(c, "caches") and c.caches[0].cache[0] is not None]
    return max(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted folder [the chat's default: bundled SmolLM2 + its adapter]")
    parser.add_argument("--adapter")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512, help="prefill step")
    parser.add_argument("--state-off", action="store_true", help="run the model with its recurrent state off")
    parser.add_argument("--original-tokens", type=int, default=8192, help="0: skip the original")
    parser.add_argument("--name", default="long_context")
    args = parser.parse_args()
    model, tokenizer, name = load_chat_model(args.model, args.adapter)
    model.use_state(not args.state_off)
    tokens = tokenizer.encode(DATA.read_text(encoding="utf-8"))
    tokens = (tokens * (1 + args.tokens // len(tokens)))[: args.tokens + 1]
    streamed, cache = block_nlls(model, tokens, args.chunk, "streamed")
    streamed = per_block(streamed, args.block)
    fresh = []
    for i in range(0, args.tokens, args.block):
        fresh += per_block(block_nlls(model, tokens[i : i + args.block + 1], args.chunk, f"fresh {i}")[0], args.block)
    result = {"model": name, "state_off": args.state_off, "arguments": vars(args), "blocks": []}
    print(f"{name}{' (state off)' if args.state_off else ''}: per-{args.block} block perplexity")
    print("| block | streamed | fresh cache | ratio |\n|---|---|---|---|")
    for i, (s, f) in enumerate(zip(streamed, fresh)):
        result["blocks"].append({"start": i * args.block, "streamed": s, "fresh": f, "ratio": s / f})
        print(f"| {i * args.block:,} | {s:.2f} | {f:.2f} | {s / f:.3f} |")
    worst = max(b["ratio"] for b in result["blocks"])
    result.update(worst_ratio=worst, goal_met=worst <= 1 + GOAL, state_peak=state_peak(cache))
    print(f"worst ratio {worst:.3f} (goal <= {1 + GOAL:.2f}: {'met' if result['goal_met'] else 'NOT met'}); "
          f"largest |state| {result['state_peak']}")
    series = {"streamed": ([b["start"] for b in result["blocks"]], streamed),
              "fresh cache": ([b["start"] for b in result["blocks"]], fresh)}
    if args.original_tokens:
        original, _ = mlx_linear.load(bundled_model("none"))
        nlls, _ = block_nlls(original, tokens[: args.original_tokens + 1], 2048, "original")
        result["original"] = per_block(nlls, args.block)
        series["original (mlx-lm)"] = (list(range(0, args.original_tokens, args.block)), result["original"])
        print("original:", ", ".join(f"{p:.2f}" for p in result["original"]))
    RESULTS.mkdir(exist_ok=True)
    line_plot(RESULTS / f"{args.name}.png", [{"x": "tokens read before the block", "y": f"perplexity of the {args.block}-token block",
              "series": series, "logy": True}], title="one cache streamed through the text, against a fresh cache per block")
    print(f"wrote {write_json(args.name, result)}, {RESULTS / (args.name + '.png')}")


if __name__ == "__main__":
    main()

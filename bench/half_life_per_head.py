"""Would a LoLCATs model read further with a half-life per head? Each head's half-life is chosen
from a grid as the one whose attention output (before the output projection) is closest to the
original's softmax attention, on the original's hidden states (layer-local, as attention transfer
sees them, on general text the evaluation does not read); then WikiText-2 perplexity by position
with the model's own half-life and with the chosen ones.

    python bench/half_life_per_head.py --model <lolcats folder> --adapter <adapter> --tokens 2048

Writes bench/results/half_life_per_head.json (the choices per layer and head, both evaluations).
"""

import argparse
import json
import math

from common import SHARED_DATA, write_json
from state_mass import load_lolcats, on_the_original, softmax_weights, window_branch

import mlx.core as mx

from mlx_linear.eval.runner import evaluate

GRID = (32, 64, 128, 256, 512, 1024, 2048, 4096, 16384)
CALIBRATION = SHARED_DATA / "gentext" / "wikipedia_en_007.jsonl"


def head_errors(attn, x, target, half_lives):
    """(grid, heads): the squared error of the mixed output per head past the window, per half-life."""
    q, k, v = attn.project(x)  # the model's own projections (LoRA on)
    window, mass = window_branch(attn, q, k, v)  # the half-life changes only the linear branch
    errors = []
    for half_life in half_lives:
        attn.method.log_decay = -math.log(2) / half_life
        output = attn.method.mix(attn.method(q, k, v, attn.rope)[0], window, mass)
        errors.append(mx.square(output - target)[:, :, attn.window :].mean(axis=(0, 2, 3)))
    return mx.stack(errors)


def wikitext(model, tokenizer, windows):
    metrics = evaluate(model, tokenizer, ["wikitext2"], task_limits={"wikitext2": windows}, window=4096,
                       data_dir=SHARED_DATA)
    return metrics["wikitext2"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--tokens", type=int, default=2048, help="a calibration sequence's length")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2, help="WikiText-2 windows of 4,096 tokens")
    parser.add_argument("--max-half-life", type=int, default=GRID[-1])
    args = parser.parse_args()
    grid = [h for h in GRID if h <= args.max_half_life]
    if not grid:
        parser.error(f"--max-half-life {args.max_half_life}: give at least {GRID[0]}, the grid's first")
    if args.tokens <= 64 or args.sequences < 1:
        parser.error(f"--tokens {args.tokens}, --sequences {args.sequences}: give more than 64 tokens (the window) and 1+ sequences")
    if not CALIBRATION.is_file():
        parser.error(f"{CALIBRATION} is missing: the bench reads general text from ../shared/data")
    model, tokenizer = load_lolcats(parser, args, "only LoLCATs' half-life is chosen here")
    texts = [json.loads(line)["text"] for line in CALIBRATION.read_text().splitlines()[-40:]]
    ids = tokenizer.encode("\n\n".join(texts))[: args.tokens * args.sequences]
    if len(ids) < args.tokens * args.sequences:
        parser.error(f"--tokens x --sequences: {CALIBRATION.name}'s last 40 articles hold {len(ids)} tokens")
    before = wikitext(model, tokenizer, args.windows)
    print("own half-life:", before, flush=True)
    original = lambda attn, q, k, v: softmax_weights(attn, q, k) @ mx.repeat(v, q.shape[1] // k.shape[1], axis=1)  # noqa: E731
    chosen = []
    for index, (attn, x, target) in enumerate(on_the_original(model, mx.array(ids).reshape(args.sequences, -1), original)):
        errors = head_errors(attn, x, target, grid)
        chosen.append([grid[i] for i in mx.argmin(errors, axis=0).tolist()])
        attn.method.log_decay = -math.log(2) / mx.array(chosen[-1], dtype=mx.float32).reshape(-1, 1, 1)
        print(f"layer {index:2d} | half-lives {chosen[-1]} | error {mx.min(errors, axis=0).sum().item():.4g}", flush=True)
    after = wikitext(model, tokenizer, args.windows)
    print("chosen half-lives:", after)
    print(f"wrote {write_json('half_life_per_head', {'arguments': vars(args), 'own': before, 'chosen': after, 'half_lives': chosen})}")


if __name__ == "__main__":
    main()

"""How much weight does a LoLCATs model give its recurrent state, against how much attention the
original puts beyond the window? On the original's hidden states (layer-local, as attention
transfer sees them), for every query of a WikiText-2 window, by position bucket:

- the original's softmax mass on keys outside the sinks and the last `window` tokens;
- the model's share of the shared denominator held by the linear term,
  phi(q) z / (g * window mass + phi(q) z).

    python bench/state_mass.py --model <lolcats folder> --adapter <adapter> --tokens 2048

If the second is far below the first, the state is underweighted whatever it holds.
Writes bench/results/state_mass.json and state_mass.png (both by layer).
"""

import argparse

from common import RESULTS, SHARED_DATA, write_json

import mlx.core as mx

import mlx_linear
from mlx_linear.errors import UserError
from mlx_linear.plot import line_plot
from mlx_linear.attention import Rope  # noqa: E402

BUCKETS = ((64, 256), (256, 1024), (1024, 4096))
TEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw.lf.txt"


def softmax_weights(attn, q, k):
    """The original's causal attention weights per query head (B, H, L, L)."""
    q, k = attn.rope(q), mx.repeat(attn.rope(k), q.shape[1] // k.shape[1], axis=1)
    scores = (q * attn.scale) @ k.swapaxes(-1, -2)
    query, key = mx.arange(q.shape[2])[:, None], mx.arange(q.shape[2])[None]
    return mx.softmax(mx.where(key <= query, scores, -mx.inf), axis=-1)


def beyond_window_mass(attn, q, k):
    """The original's attention mass outside the sinks and the window, per query (B, H, L)."""
    query, key = mx.arange(q.shape[2])[:, None], mx.arange(q.shape[2])[None]
    outside = (key <= query - attn.window) & (key >= attn.sinks)
    return (softmax_weights(attn, q, k) * outside).sum(-1)


def window_branch(attn, q, k, v):
    """The linearized layer's window branch over the whole sequence: (output, window mass)."""
    rotated = attn.rope(q)
    return attn.window_attention(rotated, attn.rope(k), v, 0, attn.sink_queries(q, rotated, 0, Rope(attn.rope, 0, attn.rotary)))


def branches(attn, q, k, v):
    """The linearized layer's two branches before they mix: (linear, window, window mass)."""
    return (attn.method(q, k, v, attn.rope)[0], *window_branch(attn, q, k, v))


def linear_share(attn, q, k, v):
    """The linear term's share of the model's shared denominator, per query (B, H, L)."""
    linear, _, mass = branches(attn, q, k, v)
    z = linear[..., -1]
    return z / (mx.sigmoid(attn.method.window_logit)[..., 0] * mass[..., 0] + z)


def on_the_original(model, tokens, per_layer):
    """[(attention, its input, per_layer(attention, q, k, v))] for every linearized layer, on the
    original's hidden states and projections (LoRA off, as attention transfer sees them)."""
    inputs, layers = [], []
    with model.teacher(record=inputs) as attentions:
        mx.eval(model.hidden_states(tokens))
        for attn, (x, _) in zip(attentions, inputs):
            layers.append((attn, x, per_layer(attn, *attn.project(x))))
            mx.eval(layers[-1][2])  # before LoRA is back on
    return layers


def load_lolcats(parser, args, why):
    """--model with --adapter; a one-line error where it does not load or is not LoLCATs."""
    try:
        model, tokenizer = mlx_linear.load(args.model, adapter_path=args.adapter)
    except UserError as error:
        parser.error(str(error))
    if getattr(getattr(model.args, "linearization", None), "method", None) != "lolcats":
        parser.error(f"{args.model} is not LoLCATs: {why}")
    return model, tokenizer


def by_bucket(values, L):
    """Mean over batch, heads and the queries of each bucket that the window reaches."""
    return {f"{lo}-{hi}": values[..., lo:min(hi, L)].mean().item() for lo, hi in BUCKETS if lo < L}


def shares(row):
    """One printed row: each bucket's original mass and the model's linear share."""
    return " | ".join(f"{b}: original {row['original'][b]:.3f}, model {row['model'][b]:.3f}" for b in row["original"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--tokens", type=int, default=2048, help="more than 64: the first bucket starts there")
    parser.add_argument("--name", default="state_mass")
    args = parser.parse_args()
    if args.tokens <= BUCKETS[0][0]:
        parser.error(f"--tokens {args.tokens}: give more than {BUCKETS[0][0]}, the window")
    if not TEXT.is_file():
        parser.error(f"{TEXT} is missing: the bench reads WikiText-2 from ../shared/data")
    model, tokenizer = load_lolcats(parser, args, "the shared denominator is what this measures")
    tokens = mx.array(tokenizer.encode(TEXT.read_text())[: args.tokens])[None]
    layers = []
    for index, (attn, x, mass) in enumerate(on_the_original(model, tokens, lambda attn, q, k, v: beyond_window_mass(attn, q, k))):
        share = linear_share(attn, *attn.project(x))  # LoRA on again: the model's own projections
        layers.append({"layer": index, "original": by_bucket(mass, args.tokens), "model": by_bucket(share, args.tokens)})
        print(f"layer {index:2d} | {shares(layers[-1])}", flush=True)
    mean = {side: {b: sum(r[side][b] for r in layers) / len(layers) for b in layers[0][side]} for side in ("original", "model")}
    print(f"all layers | {shares(mean)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    series = {f"{side} {b}": (list(range(len(layers))), [r[side][b] for r in layers]) for side in mean for b in mean[side]}
    line_plot(RESULTS / f"{args.name}.png", [{"x": "layer", "y": "share beyond the window", "series": series}],
              title="beyond the window: the original's attention, the linear term's share")
    print(f"wrote {write_json(args.name, {'arguments': vars(args), 'mean': mean, 'layers': layers})}")


if __name__ == "__main__":
    main()

"""Speed and memory at real model shapes, on whatever device MLX has: every method's recipe and the
original transformer (mlx-lm's) in one run, on the same random weights at the exact shapes of
Llama-3.2-1B or Mistral-7B (bench/convert_memory.py's), bf16 on a GPU (float32 on the CPU).

    python bench/shapes.py --shape 1b                                   # contexts 1k, 16k, 64k; batch 16 at 16k
    python bench/shapes.py --shape 1b --contexts 1024,16384,65536,131072 --recipes chat,liger-gla
    python bench/shapes.py --shape 7b --quantize --train                # + QLoRA lora-train at 2,048
    python bench/shapes.py --shape tiny --contexts 256,1024 --batch-context 256   # a CPU trial in a minute

Each (batch, context): the context prefilled in steps of --prefill-step (prefill tok/s, one
sequence; a batch decodes from copies of its cache in mlx-lm's batch caches, as mlx_lm.server does), then --decode-tokens greedy steps timed
(decode tok/s of all sequences; two first steps, which trace, left out), peak memory over both.
Both models run the same loop (the model called on the cache, its states evaluated each step).
With --train: lora-train's update (mlx_linear.train.Trainer) beside mlx-lm's LoRA trainer on the
original, LoRA on q, k, v, sequence --seq-len, random tokens. Ratios and the issue's goals are
printed and written to bench/results/shapes_<shape>.json.
"""

import argparse
import json

from common import batch_of, decode_seconds, prefilled, write_json  # noqa: F401  (loads the BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from convert_memory import SHAPES
from mlx_linear.chat.model import CONVERSION_FILE, bundled_adapter
from mlx_linear.model import Model, ModelArgs, base_architecture
from mlx_linear.train import TrainConfig
from train import mlx_lm_speed, trainer_speed

TINY = {**SHAPES["1b"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096}
SHAPES = {**SHAPES, "tiny": TINY}


def chat_recipe():
    """The chat's conversion (method, sinks, options), as the packaged adapter was trained on."""
    return json.loads((bundled_adapter() / CONVERSION_FILE).read_text())


RECIPES = {
    "chat": chat_recipe,
    "liger-gla": lambda: {"method": "liger-gla"},
    "liger-hgrn2": lambda: {"method": "liger-hgrn2"},
    "liger-gsa": lambda: {"method": "liger-gsa"},
    "lolcats": lambda: {"method": "lolcats"},
    "supra": lambda: {"method": "supra"},
}
GOALS = {  # (kind, batch, context): the least ratio to the original
    ("decode", 1, 1024): 1.0, ("decode", 1, 65536): 1.5, ("decode", 16, 16384): 2.0,
    ("prefill", 1, 16384): 1.0, ("prefill", 1, 65536): 3.0,
}


def random_weights(model, dtype):
    """Random weights of `dtype` in place of the initialisation (never materialised): norms 1."""
    def draw(p):
        return mx.ones(p.shape, dtype) if p.ndim == 1 else (0.02 * mx.random.normal(p.shape)).astype(dtype)

    model.update(tree_map(draw, model.parameters()))
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def original_model(config, dtype, quantize):
    arch = base_architecture(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    random_weights(model, dtype)
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    return model


def linearized(config, recipe, original, dtype):
    """The recipe's model on the original's weights (the same arrays); its own parameters in `dtype`."""
    model = Model(ModelArgs.from_dict({**config, "linearization": {"window": 64, **recipe}}))
    if any(isinstance(m, nn.QuantizedLinear) for _, m in original.named_modules()):
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and model.quant_predicate(p, m))
    own = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters()) if ".method." in k}
    model.update(tree_unflatten(list({**dict(tree_flatten(original.parameters())), **own}.items())))
    mx.eval(model.parameters())
    return model


def timed_run(model, batch, context, prefill_step, decode_tokens, vocab):
    """Prefill `context` random tokens (one sequence; a batch decodes from copies of its cache,
    common.batch_of), then decode greedily."""
    tokens = mx.random.randint(0, vocab, (1, context), key=mx.random.key(context))
    mx.clear_cache()
    mx.reset_peak_memory()
    cache, token, prefill_s = prefilled(model, tokens, prefill_step)
    if batch > 1:
        cache, token = batch_of(cache, batch), mx.repeat(token, batch)
    decode_s = decode_seconds(model, cache, token, decode_tokens)
    return {"batch": batch, "context": context, "prefill_tps": context / prefill_s,
            "decode_tps": batch / decode_s, "peak_gb": mx.get_peak_memory() / 1e9}


def ratios(rows):
    """{recipe: {"decode"|"prefill": {(batch, context): ratio to the original}}}."""
    original = {(r["batch"], r["context"]): r for r in rows["original"]}
    out = {}
    for name, runs in rows.items():
        if name != "original":
            out[name] = {kind: {(r["batch"], r["context"]): r[f"{kind}_tps"] / original[(r["batch"], r["context"])][f"{kind}_tps"]
                                for r in runs if (r["batch"], r["context"]) in original} for kind in ("decode", "prefill")}
    return out


def goals(rows, ratio, prefill_step):
    """The goals measured in this run; memory: flat from the contexts that fill a prefill step."""
    report = {}
    for name, kinds in ratio.items():
        for (kind, batch, context), least in GOALS.items():
            value = kinds[kind].get((batch, context))
            if value is not None:
                report[f"{name}: {kind} >= {least}x the original at batch {batch}, {context}"] = {"value": value, "met": value >= least}
        peaks = [r["peak_gb"] for r in rows[name] if r["batch"] == 1 and r["context"] >= prefill_step]
        if len(peaks) > 1:
            spread = max(peaks) / min(peaks) - 1
            report[f"{name}: peak memory flat within 10% from {prefill_step}"] = {"value": spread, "met": spread <= 0.10}
    return report


def train_rows(config, recipes, dtype, quantize, seq_len, updates):
    """lora-train's update on each recipe beside mlx-lm's trainer on the original."""
    def stream():
        while True:
            yield np.random.randint(0, config["vocab_size"], seq_len + 1).tolist(), [True] * (seq_len + 1)

    train_config = TrainConfig(seq_len=seq_len, grad_accumulation=1, iters=updates, grad_checkpoint=True)
    rows = {"original (mlx-lm's trainer)": mlx_lm_speed(original_model(config, dtype, quantize), stream(), seq_len, updates, True)}
    for name in recipes:
        model = linearized(config, RECIPES[name](), original_model(config, dtype, quantize), dtype)
        rows[f"{name} (lora-train)"] = trainer_speed(model, stream(), train_config, updates)
        del model
    for name, row in rows.items():
        print(f"train {name:32s} seq {seq_len}: {row['tokens_per_second']:9.1f} tok/s, peak {row['peak_memory_gb']:6.2f} GB", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--contexts", default="1024,16384,65536")
    parser.add_argument("--batch", type=int, default=16, help="the batched run's sequences (0: none)")
    parser.add_argument("--batch-context", type=int, default=16384)
    parser.add_argument("--prefill-step", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--quantize", action="store_true", help="4-bit weights (group 64), both models")
    parser.add_argument("--train", action="store_true", help="also lora-train's speed and memory beside mlx-lm's")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--tag", default="", help="appended to the results' name (e.g. fused)")
    args = parser.parse_args()
    config, recipes = SHAPES[args.shape], [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"--recipes: no recipe {unknown[0]!r}; give some of {', '.join(RECIPES)}")
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    runs = [(1, int(c)) for c in args.contexts.split(",")] + ([(args.batch, args.batch_context)] if args.batch else [])
    original = original_model(config, dtype, args.quantize)
    models = {"original": original, **{name: linearized(config, RECIPES[name](), original, dtype) for name in recipes}}
    rows = {name: [] for name in models}
    for batch, context in runs:
        for name, model in models.items():
            row = timed_run(model, batch, context, args.prefill_step, args.decode_tokens, config["vocab_size"])
            rows[name].append(row)
            print(f"{name:12s} batch {batch:2d} context {context:6d} | prefill {row['prefill_tps']:9.1f} tok/s | "
                  f"decode {row['decode_tps']:8.1f} tok/s | peak {row['peak_gb']:6.2f} GB", flush=True)
    ratio = ratios(rows)
    for name, kinds in ratio.items():
        for kind, values in kinds.items():
            print(f"{name:12s} {kind:7s} x original: " + ", ".join(f"b{b} {c}: {v:.2f}" for (b, c), v in values.items()))
    report = goals(rows, ratio, args.prefill_step)
    for goal, g in report.items():
        print(f"goal {goal}: {g['value']:.2f}: {'met' if g['met'] else 'NOT met'}")
    del models, original
    trained = train_rows(config, recipes[:2], dtype, args.quantize, args.seq_len, args.updates) if args.train else None
    path = write_json(f"shapes_{args.shape}{'_4bit' if args.quantize else ''}{'_' + args.tag if args.tag else ''}", {
        "args": vars(args), "config": config, "dtype": str(dtype), "runs": rows,
        "ratios": {n: {k: {f"{b}x{c}": v for (b, c), v in d.items()} for k, d in kinds.items()} for n, kinds in ratio.items()},
        "goals": report, "train": trained})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

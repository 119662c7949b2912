"""`mlx_linear lora-train` and `mlx_linear fuse`."""

import click

from ..cli import log
from ..errors import UserError


def parse_weights(data, weights):
    if not weights:
        return [1.0] * len(data)
    values = [float(w) for w in weights.split(",")]
    if len(values) != len(data) or min(values) < 0 or sum(values) <= 0:
        raise UserError(f"--data-weights needs {len(data)} non-negative numbers (one per --data), e.g. 0.7,0.3")
    return values


@click.command("lora-train")
@click.option("--model", required=True, type=click.Path(), help="Converted model folder (mlx_linear convert).")
@click.option("--data", multiple=True, required=True, help="JSONL file or folder; repeat to mix sources.")
@click.option("--data-weights", help="Mixing proportions, one per --data, e.g. 0.7,0.3.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Adapter folder.")
@click.option("--iters", type=click.IntRange(1), help="Optimizer updates.")
@click.option("--tokens", type=click.IntRange(1), help="Token budget (instead of --iters).")
@click.option("--seq-len", default=1024, show_default=True, type=click.IntRange(2), help="Packed sequence length.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1), help="Sequences per micro-step.")
@click.option("--grad-accumulation", default=8, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", default=1e-3, show_default=True, type=float)
@click.option("--method-lr", type=float, help="Learning rate of a method's own parameters [--learning-rate].")
@click.option("--weight-decay", default=0.01, show_default=True, type=float, help="On the LoRA weights.")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lora-alpha", default=8.0, show_default=True, type=float, help="LoRA scale is alpha / rank.")
@click.option("--lora-targets", default="q,k,v", show_default=True, help="Any of q,k,v,o,mlp.")
@click.option("--distill", is_flag=True, help="KL from the original model (same weights, softmax, no adapter).")
@click.option("--ce-weight", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="With --distill.")
@click.option("--attention-transfer", is_flag=True, help="Match each layer's softmax attention output (stage 1).")
@click.option("--init-adapter", type=click.Path(file_okay=False), help="Start from this adapter (e.g. stage 1).")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute each layer in the backward pass (less memory).")
@click.option("--val-every", default=50, show_default=True, type=click.IntRange(1), help="Updates between validations.")
@click.option("--val-sequences", default=4, show_default=True, type=click.IntRange(1), help="Per data source.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --output (adapter, optimizer, data position).")
@click.option("--force", is_flag=True, help="Start over in a non-empty --output.")
def lora_train(model, data, data_weights, output, **options):
    """Uptrain a converted model with LoRA (Liger's recipe by default)."""
    from .. import load
    from ..output_checks import check_writable

    check_writable(output)
    from .data import load_source
    from .trainer import TrainConfig, train

    targets = tuple(t.strip() for t in options.pop("lora_targets").split(",") if t.strip())
    alpha = options.pop("lora_alpha")
    resume, force = options.pop("resume"), options.pop("force")
    distill, transfer = options.pop("distill"), options.pop("attention_transfer")
    if distill and transfer:
        raise UserError("choose one of --distill and --attention-transfer")
    objective = "distill" if distill else "transfer" if transfer else "ce"
    config = TrainConfig(lora_targets=targets, lora_scale=alpha / options["lora_rank"], objective=objective, **options)
    config.updates  # a missing budget fails before any loading
    sources = [load_source(d, w, seed=config.seed) for d, w in zip(data, parse_weights(data, data_weights))]
    model_obj, tokenizer = load(model, dequantize=False)  # QLoRA: train on the quantized weights
    state = train(model_obj, tokenizer, sources, config, output, resume=resume, force=force, log=log)
    log(f"done: {state['update']} updates, {state['tokens']} tokens; best validation loss {state['best_val']:.4f} "
        f"at update {state['best_update']}; adapter in {output}")


@click.command()
@click.option("--model", required=True, type=click.Path(), help="Converted model folder.")
@click.option("--adapter", required=True, type=click.Path(), help="Adapter folder (lora-train -o).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Fused model folder.")
@click.option("--dequantize", is_flag=True, help="Write float weights even if the model is quantized.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def fuse(model, adapter, output, dequantize, force):
    """Merge an adapter into a standalone converted model folder."""
    from .fuse import fuse as run

    run(model, adapter, output, dequantize=dequantize, force=force, log=log)

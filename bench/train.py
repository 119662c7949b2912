"""LoRA training speed and peak memory: mlx_linear lora-train on the converted SmolLM2 against
mlx-lm's own trainer (mlx_lm.tuner.trainer.train) on the original transformer, same data.

    python bench/train.py [--seq-lens 1024,4096] [--steps 2] [--checkpoint-from 4096] [--data ../shared/data/gentext]
    python bench/train.py --seq-lens 1024,2048 --transfer lolcats   # + attention transfer against CE, same model

With --transfer METHOD, the converted SmolLM2 with that method also trains with attention transfer
(stage 1: its own parameters, layer-local, no LM head) and with cross-entropy (LoRA), for the
speed ratio of the two stages.
"""

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from common import SHARED_DATA, write_json

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, grad_checkpoint
from mlx_lm.tuner.trainer import train as mlx_lm_train
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_linear
from mlx_linear.adapters import apply_lora, lora_config
from mlx_linear.convert import bundled_model
from mlx_linear.train import TrainConfig, load_source
from mlx_linear.train.data import sequences
from mlx_linear.train.trainer import Trainer, batches

DATA = SHARED_DATA / "gentext"


@contextmanager
def own_checkpointing(model):
    """mlx-lm's grad_checkpoint patches the layer class itself: undo it after a run, so that the
    next model (the same TransformerBlock class) is not checkpointed twice."""
    cls = type(model.layers[0])
    call = cls.__call__
    try:
        yield
    finally:
        cls.__call__ = call


def trainer_speed(model, stream, config, updates):
    """tokens/s (the first update, which traces, left out) and peak GB of lora-train's update
    (mlx_linear.train.Trainer, LoRA applied as lora-train applies it) on `stream`'s (tokens, mask)."""
    targets = () if config.objective == "transfer" else config.lora_targets
    apply_lora(model, lora_config(model, config.lora_rank, config.lora_scale, config.lora_dropout, targets))
    with own_checkpointing(model):
        if config.grad_checkpoint:
            grad_checkpoint(model.layers[0])
        run = SimpleNamespace(state={"update": 0, "sequences": 0, "tokens": 0, "log": []})
        trainer = Trainer(model, config, run, mx.distributed.init())
        data = batches(stream, config.batch_size, 0, 1)
        model.train()
        mx.reset_peak_memory()
        rates = [trainer.update(data)["tokens_per_second"] for _ in range(updates + 1)][1:]
    return {"tokens_per_second": sum(rates) / len(rates), "peak_memory_gb": mx.get_peak_memory() / 1e9}


def ours(source, seq_len, steps, grad_checkpoint, method="liger-gla", objective="ce"):
    model, tokenizer = mlx_linear.load(bundled_model(method))
    config = TrainConfig(seq_len=seq_len, grad_accumulation=1, iters=steps, val_every=10**9, val_sequences=1,
                         grad_checkpoint=grad_checkpoint, objective=objective)
    return trainer_speed(model, sequences([source], tokenizer, seq_len), config, steps)


class Recorder(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(info)


def mlx_lm_speed(model, stream, seq_len, steps, grad_checkpoint):
    """mlx-lm's LoRA trainer on a transformer, LoRA on q, k, v: tokens/s after warm-up, peak GB."""
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), lora_config(model)["lora_parameters"])

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        while True:
            tokens, _ = next(stream)
            yield mx.array([tokens]), mx.array([[0, seq_len]])

    recorder = Recorder()
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as out, own_checkpointing(model):
        args = TrainingArgs(batch_size=1, iters=2 * steps, steps_per_report=steps, steps_per_eval=10**9,
                            max_seq_length=seq_len + 1, adapter_file=str(Path(out) / "a.safetensors"),
                            grad_checkpoint=grad_checkpoint)
        mlx_lm_train(model, optim.AdamW(1e-3), [0], None, args, iterate_batches=iterate_batches, training_callback=recorder)
    # The second report window excludes compilation and warm-up.
    return {"tokens_per_second": recorder.reports[-1]["tokens_per_second"], "peak_memory_gb": mx.get_peak_memory() / 1e9}


def original(source, seq_len, steps, grad_checkpoint):
    """mlx-lm's trainer on the original SmolLM2 (float32 on the CPU)."""
    model, tokenizer = mlx_linear.load(bundled_model("none"))
    return mlx_lm_speed(model, sequences([source], tokenizer, seq_len), seq_len, steps, grad_checkpoint)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data", default=str(DATA))
    # On the CPU, softmax attention keeps its (heads, L, L) scores of every layer for the backward
    # pass: 30 x 1.2 GB at 4096 tokens, beyond this machine's 24 GB, so both models recompute layers.
    parser.add_argument("--checkpoint-from", type=int, default=4096,
                        help="sequence length from which both models train with gradient checkpointing")
    parser.add_argument("--transfer", metavar="METHOD", help="also time attention transfer and CE on this method")
    args = parser.parse_args()
    source = load_source(args.data)
    results = []
    for seq_len in map(int, args.seq_lens.split(",")):
        checkpoint = seq_len >= args.checkpoint_from
        row = {"seq_len": seq_len, "grad_checkpoint": checkpoint, "linearized": ours(source, seq_len, args.steps, checkpoint),
               "original": original(source, seq_len, args.steps, checkpoint)}
        row["speed_ratio"] = row["linearized"]["tokens_per_second"] / row["original"]["tokens_per_second"]
        row["memory_ratio"] = row["linearized"]["peak_memory_gb"] / row["original"]["peak_memory_gb"]
        if args.transfer:
            row["transfer"] = ours(source, seq_len, args.steps, checkpoint, args.transfer, "transfer")
            row["ce_same_method"] = ours(source, seq_len, args.steps, checkpoint, args.transfer, "ce")
            row["transfer_speed_ratio"] = row["transfer"]["tokens_per_second"] / row["ce_same_method"]["tokens_per_second"]
            print(f"seq {seq_len}, {args.transfer}: attention transfer {row['transfer']['tokens_per_second']:.1f} tok/s, "
                  f"cross-entropy {row['ce_same_method']['tokens_per_second']:.1f} tok/s (x{row['transfer_speed_ratio']:.2f})",
                  flush=True)
        results.append(row)
        print(f"seq {seq_len}: lora-train {row['linearized']['tokens_per_second']:.1f} tok/s, "
              f"{row['linearized']['peak_memory_gb']:.2f} GB | mlx-lm original {row['original']['tokens_per_second']:.1f} tok/s, "
              f"{row['original']['peak_memory_gb']:.2f} GB | speed x{row['speed_ratio']:.2f}, memory x{row['memory_ratio']:.2f}",
              flush=True)
    path = write_json("train", {"results": results, **vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""LoRA uptraining of a linearized model (objectives in losses.py): gradient accumulation,
data parallelism with mx.distributed, validation, best-adapter keeping, resume.
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint

from ..adapters import (ADAPTER_FILE, adapter_weights, apply_lora, check_targets, load_adapter_weights, lora_config,
                        read_adapter_config, save_adapter)
from ..errors import Interrupted, UserError
from ..output_checks import disk_full_error
from ..progress import Progress
from ..files import save_safetensors, write_json
from .data import Packer, sequences
from .losses import make_loss

LAST_FILE = "last.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
# Updates in a row whose batches hold no trainable token (chat replies cut off by --seq-len)
# before the run gives up: they are skipped, since dividing by their zero tokens gives NaN.
MAX_EMPTY_UPDATES = 16


class NonFiniteLoss(UserError):
    pass


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_size: int = 1  # sequences per micro-step, over all ranks
    grad_accumulation: int = 8
    iters: Optional[int] = None  # optimizer updates; or a token budget:
    tokens: Optional[int] = None
    learning_rate: float = 1e-3
    method_lr: Optional[float] = None  # for a method's own parameters; default learning_rate
    weight_decay: float = 0.01  # LoRA weights only
    lora_rank: int = 8
    lora_scale: float = 1.0  # alpha / rank
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("q", "k", "v")
    objective: str = "ce"  # ce, distill or transfer (see losses.py)
    ce_weight: float = 0.0  # with distill: share of cross-entropy in the loss
    init_adapter: Optional[str] = None  # start from these LoRA weights (e.g. an attention-transfer run)
    grad_checkpoint: bool = False
    val_every: int = 50  # updates
    val_sequences: int = 4  # per data source
    seed: int = 0

    def __post_init__(self):
        """Values that would train nonsense are refused before any work."""
        check_targets(self.lora_targets)
        rates = (("--learning-rate", self.learning_rate, True), ("--method-lr", self.method_lr, True),
                 ("--weight-decay", self.weight_decay, False), ("--lora-alpha (over --lora-rank)", self.lora_scale, True))
        for flag, value, positive in rates:
            if value is not None and (value < 0 or (positive and value == 0) or not math.isfinite(value)):
                raise UserError(f"{flag} {value:g}: give a {'positive' if positive else 'non-negative'} number")

    @property
    def tokens_per_update(self):
        return self.seq_len * self.batch_size * self.grad_accumulation

    @property
    def updates(self):
        if self.iters:
            return self.iters
        if self.tokens:
            return max(1, math.ceil(self.tokens / self.tokens_per_update))
        raise UserError("give a budget: --iters N or --tokens N")


def batches(stream, batch_size, rank, world):
    """Global batches of `batch_size` sequences; this rank's rows as (inputs, targets, mask)."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {world} processes")
    while True:
        rows = [next(stream) for _ in range(batch_size)][rank::world]
        tokens = mx.array(np.array([t for t, _ in rows], dtype=np.int32))
        mask = mx.array(np.array([m for _, m in rows], dtype=np.bool_))
        yield tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


class Run:
    """The output folder: adapters, optimizer state, logs; only rank 0 writes."""

    def __init__(self, folder, lora, config, writer=True):
        self.folder, self.lora, self.config, self.writer = Path(folder), lora, config, writer
        self.state = {"update": 0, "sequences": 0, "tokens": 0, "best_val": None, "best_update": None, "log": []}

    def record_validation(self, val):
        """Log a validation; True if it is the best so far."""
        best = self.state["best_val"] is None or val["all"]["loss"] < self.state["best_val"]
        if best:
            self.state["best_val"], self.state["best_update"] = val["all"]["loss"], self.state["update"]
        self.state["log"].append({"update": self.state["update"], "tokens": self.state["tokens"], "val": val})
        return best

    def write_logs(self):
        """log.csv (one row per update) and loss.png (training and validation loss against tokens)."""
        if not self.writer:
            return
        from ..plot import line_plot

        updates = [e for e in self.state["log"] if "loss" in e]
        vals = [e for e in self.state["log"] if "val" in e]
        columns = ["update", "tokens", "loss", "ce", "tokens_per_second", "peak_memory_gb"]
        rows = [",".join(columns)] + [",".join(f"{e[c]:.6g}" for c in columns) for e in updates]
        (self.folder / "log.csv").write_text("\n".join(rows) + "\n")
        series = {"train": ([e["tokens"] for e in updates], [e["loss"] for e in updates])}
        for name in vals[0]["val"] if vals else ():
            series[f"valid {name}"] = ([e["tokens"] for e in vals], [e["val"][name]["loss"] for e in vals])
        panel = {"x": "tokens", "y": f"{self.config.objective} loss", "series": series}
        line_plot(self.folder / "loss.png", [panel], title=f"lora-train: {self.folder.name}")

    def save(self, model, optimizer, best=False):
        if not self.writer:
            return
        save_adapter(self.folder, model, self.lora, name=LAST_FILE)
        if best:
            save_adapter(self.folder, model, self.lora, name=ADAPTER_FILE)
        save_safetensors(self.folder / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
        self.write_json(STATE_FILE, self.state)

    def write_json(self, name, data):
        if self.writer:
            write_json(self.folder / name, data)

    def resume(self, model, optimizer):
        weights = mx.load(str(self.folder / LAST_FILE))
        model.load_weights(list(weights.items()), strict=False)
        optimizer.state = tree_unflatten(list(mx.load(str(self.folder / OPTIMIZER_FILE)).items()))
        self.state = json.loads((self.folder / STATE_FILE).read_text())


def prepare_output(folder, resume, force):
    folder = Path(folder)
    if resume:
        missing = [f for f in (LAST_FILE, OPTIMIZER_FILE, STATE_FILE) if not (folder / f).is_file()]
        if missing:
            raise UserError(f"cannot resume from {folder}: {missing[0]} is missing (start without --resume)")
    elif folder.exists() and any(folder.iterdir()) and not force:
        raise UserError(f"{folder} already holds a run: pass --resume to continue it or --force to start over")
    folder.mkdir(parents=True, exist_ok=True)


def validate(model, loss, val_sets, rank, world, with_ce=False):
    """Loss and cross-entropy per data source (and overall), each rank taking its share.

    `with_ce`: the objective reports no cross-entropy, so run one more forward for it.
    """
    ce = make_loss("ce")
    results = {}
    for name, seqs in val_sets.items():
        totals = mx.zeros(4)
        for tokens, mask in seqs[rank::world]:
            tokens, mask = mx.array(tokens)[None], mx.array(mask)[None]
            args = (model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:])
            values = loss(*args)
            if with_ce:
                values = values[:2] + ce(*args)[2:]
            totals = totals + mx.stack(values)
            mx.eval(totals)
        totals = mx.distributed.all_sum(totals, stream=mx.cpu) if world > 1 else totals
        loss_sum, norm, ce_sum, ce_n = totals.tolist()
        results[name] = {"loss": loss_sum / max(norm, 1), "ce": ce_sum / max(ce_n, 1)}
    results["all"] = {k: float(np.mean([r[k] for r in results.values()])) for k in ("loss", "ce")}
    return results


def make_optimizer(config):
    """AdamW; a method's parameters (e.g. identity-initialised maps) get no weight decay."""
    lora = optim.AdamW(config.learning_rate, weight_decay=config.weight_decay, bias_correction=True)
    method = optim.AdamW(config.method_lr or config.learning_rate, weight_decay=0.0, bias_correction=True)
    return optim.MultiOptimizer([method, lora], [lambda path, _: ".method." in path])


class Trainer:
    """One process's share of a run: model, optimizer, data, and the update step."""

    def __init__(self, model, config, run, world):
        self.model, self.config, self.run = model, config, run
        self.rank, self.size = world.rank(), world.size()
        self.optimizer = make_optimizer(config)
        self.loss = make_loss(config.objective, config.ce_weight)
        self.value_and_grad = nn.value_and_grad(model, self.loss)
        self.previous = None

    def micro_step(self, inputs, targets, mask):
        (loss_sum, norm, ce_sum, ce_n), grads = self.value_and_grad(self.model, inputs, targets, mask)
        mx.eval(loss_sum, norm, ce_sum, ce_n, grads)
        return np.array([loss_sum.item(), norm.item(), ce_sum.item(), ce_n.item()]), grads

    def accumulate(self, data):
        """(gradient sum, loss sums) over grad_accumulation micro-batches, summed over ranks."""
        grad_sum, sums = None, np.zeros(4)
        for _ in range(self.config.grad_accumulation):
            values, grads = self.micro_step(*next(data))
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            sums += values
        if self.size > 1:
            sums = np.array(mx.distributed.all_sum(mx.array(sums, dtype=mx.float32), stream=mx.cpu).tolist())
        return grad_sum, sums

    def non_empty(self, data):
        """accumulate() of the next batches holding a trainable token; empty ones are skipped."""
        config, state = self.config, self.run.state
        for _ in range(MAX_EMPTY_UPDATES):
            grad_sum, sums = self.accumulate(data)
            if sums[1] > 0:  # every rank sees the same sums, so all skip together
                return grad_sum, sums
            state["sequences"] += config.batch_size * config.grad_accumulation  # resume goes on past them
            state["skipped_updates"] = state.get("skipped_updates", 0) + 1
        raise UserError(
            f"{MAX_EMPTY_UPDATES} updates in a row had no trainable token (chat replies fall past --seq-len "
            f"{config.seq_len}?): raise --seq-len or check the data"
        )

    def update(self, data):
        """One optimizer update from grad_accumulation micro-batches; refuses a non-finite loss or gradient."""
        config, state = self.config, self.run.state
        start = time.perf_counter()
        grad_sum, sums = self.non_empty(data)
        grads = tree_map(lambda g: g * (self.size / sums[1]), average_gradients(grad_sum))
        finite_grads = mx.all(mx.array([mx.isfinite(g).all() for _, g in tree_flatten(grads)])).item()
        if not (np.isfinite(sums[0]) and finite_grads):  # every rank sees the same sums and gradients
            what = f"the loss became {sums[0]}" if not np.isfinite(sums[0]) else "the gradients became infinite or NaN"
            raise NonFiniteLoss(
                f"{what} at update {state['update'] + 1}: stopped; the last good adapter is in "
                f"{self.run.folder} (lower --learning-rate, then --resume)"
            )
        # The weights before this update gave finite losses: keep them to fall back on.
        self.previous = (tree_map(lambda x: x, self.model.trainable_parameters()), tree_map(lambda x: x, self.optimizer.state))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        state["update"] += 1
        state["sequences"] += config.batch_size * config.grad_accumulation
        state["tokens"] += config.tokens_per_update
        entry = {
            "update": state["update"],
            "tokens": state["tokens"],
            "loss": sums[0] / sums[1],
            "ce": sums[2] / max(sums[3], 1),
            "tokens_per_second": config.tokens_per_update / (time.perf_counter() - start),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        state["log"].append(entry)
        return entry

    def roll_back(self):
        """Return to the weights of the last update whose losses were finite."""
        if self.previous is not None:
            params, self.optimizer.state = self.previous
            self.model.update(params)

    def checkpoint(self, val_sets):
        val = validate(self.model, self.loss, val_sets, self.rank, self.size, self.config.objective == "transfer")
        self.run.save(self.model, self.optimizer, best=self.run.record_validation(val))
        return val

    def save(self):
        self.run.save(self.model, self.optimizer)
        self.run.write_logs()


def validation_sets(sources, tokenizer, config):
    valid = sequences(sources, tokenizer, config.seq_len, config.seed, split="valid")
    return {Path(s.path).stem: [x for _, x in zip(range(config.val_sequences), it)] for s, it in zip(sources, valid)}


def check_trainable(val_sets, config):
    for name, seqs in val_sets.items():
        if not any(any(mask[1:]) for _, mask in seqs):
            raise UserError(
                f"the validation records of {name} hold no trainable token within --seq-len {config.seq_len} "
                "(chat prompts longer than that leave no reply): raise --seq-len"
            )


def train(model, tokenizer, sources, config: TrainConfig, output, resume=False, force=False, log=print):
    """Train LoRA adapters (and method parameters) on `sources`; returns the run's state."""
    world = mx.distributed.init()
    val_sets = validation_sets(sources, tokenizer, config)  # data that cannot train fails before any output
    check_trainable(val_sets, config)
    fresh = not Path(output).exists()
    if world.rank() == 0:
        prepare_output(output, resume, force)
    try:
        return run_training(model, tokenizer, sources, val_sets, config, output, resume, world, log)
    except (NonFiniteLoss, KeyboardInterrupt):
        raise  # they saved a resumable run
    except Exception as e:
        # A run that never trained leaves nothing behind: a rerun would refuse the folder.
        if fresh and world.rank() == 0 and never_trained(Path(output)):
            shutil.rmtree(output, ignore_errors=True)
        if isinstance(e, OSError):  # files are replaced whole, so what was saved before is intact
            raise disk_full_error(output, e, "free some space, then run again (with --resume once it has trained)") from None
        raise


def never_trained(folder):
    try:
        return json.loads((folder / STATE_FILE).read_text())["update"] == 0
    except (OSError, ValueError, KeyError):
        return True


def run_training(model, tokenizer, sources, val_sets, config, output, resume, world, log):
    mx.random.seed(config.seed)  # the same LoRA initialisation on every rank and every run
    # Attention transfer (stage 1) trains the method's own parameters alone, as LoLCATs does.
    targets = () if config.objective == "transfer" else config.lora_targets
    lora = read_adapter_config(output) if resume else lora_config(
        model, config.lora_rank, config.lora_scale, config.lora_dropout, targets
    )
    apply_lora(model, lora)
    if config.init_adapter and not resume:
        load_adapter_weights(model, config.init_adapter)  # e.g. stage 1's method parameters
    if not adapter_weights(model):
        raise UserError("nothing to train: attention transfer trains a method's own parameters and this model's "
                        "method has none (convert with --method lolcats, or liger-gla with feature_proj=true)")
    run = Run(output, lora, config, writer=world.rank() == 0)
    trainer = Trainer(model, config, run, world)
    if resume:
        run.resume(model, trainer.optimizer)
    if config.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    run.write_json("train_config.json", {**asdict(config), "sources": [(s.path, s.weight) for s in sources]})

    packer = Packer(config.seq_len)
    stream = sequences(sources, tokenizer, config.seq_len, config.seed, packer=packer)
    for _ in range(run.state["sequences"]):
        next(stream)  # resume where the data stopped
    data = batches(stream, config.batch_size, world.rank(), world.size())

    remaining = (config.updates - run.state["update"]) * config.tokens_per_update
    progress = Progress(remaining, "tok", "train", stream=None if run.writer else open(os.devnull, "w"))
    model.train()
    try:
        val = trainer.checkpoint(val_sets)
        while run.state["update"] < config.updates:
            entry = trainer.update(data)
            progress.update(config.tokens_per_update, loss=entry["loss"], val=val["all"]["loss"], peak_gb=entry["peak_memory_gb"])
            if run.state["update"] % config.val_every == 0 or run.state["update"] == config.updates:
                val = trainer.checkpoint(val_sets)
        run.write_logs()
    except NonFiniteLoss:
        trainer.roll_back()
        trainer.save()
        raise
    except KeyboardInterrupt:
        trainer.save()
        raise Interrupted(f"saved the adapter after {run.state['update']} updates in {output}; continue with --resume") from None
    finally:
        progress.close()
    if packer.truncated:
        log(f"{packer.truncated} chat examples were longer than {config.seq_len + 1} tokens and were truncated")
    if run.state.get("skipped_updates"):
        log(f"{run.state['skipped_updates']} updates held no trainable token (replies past --seq-len) and were skipped")
    return run.state

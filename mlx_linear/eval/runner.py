"""Run tasks on a model in memory: `evaluate(model, tokenizer, tasks, limit)` -> metrics."""

import math
import time
from dataclasses import dataclass
from itertools import islice

from ..errors import UserError
from ..progress import Progress

from .data import data_dir as resolve_data_dir
from .scoring import Scorer
from .tasks import TASKS, Retrieval, get_task

DEFAULT_TASKS = ("piqa", "arc_easy", "hellaswag", "lambada", "wikitext2")


@dataclass
class TaskResult:
    metrics: dict
    documents: int
    tokens: int  # run through the model
    seconds: float


def resolve_tasks(names, data_dir=None, lengths=None):
    """The Task objects and the local data folder (None: the hub), checked (the hub's files
    fetched) before any model runs; `lengths` (tokens) replaces the prompt lengths of the tasks
    that have them (passkey, RULER's)."""
    root = resolve_data_dir(data_dir)
    tasks = [get_task(n) for n in names]
    if lengths:
        set_lengths(tasks, lengths)
    for task in tasks:
        task.check(root)
    return tasks, root


def set_lengths(tasks, lengths):
    retrieval = [t for t in tasks if isinstance(t, Retrieval)]
    if not retrieval:
        names = sorted(name for name, cls in TASKS.items() if issubclass(cls, Retrieval))
        raise UserError(f"--lengths: no task in --tasks has prompt lengths (those that do: {', '.join(names)})")
    for task in retrieval:
        task.lengths = tuple(lengths)


def run_task(task, scorer, root, limit=None, desc=None, progress=True) -> TaskResult:
    docs = list(islice(task.documents(root, scorer), limit))
    if not docs:
        raise UserError(f"{task.name}: no documents in {task.source(root)}: check the file")
    for number, doc in enumerate(docs, 1):
        try:
            task.validate(doc)
        except (KeyError, IndexError, TypeError, ValueError) as e:  # from the record: our own bugs stay tracebacks
            raise UserError(f"{task.name} document {number}: {type(e).__name__}: {e}: check that record") from e
    bar = Progress(len(docs), "doc", desc or task.name) if progress else None
    tokens, start = scorer.tokens, time.perf_counter()
    scores = []
    for number, doc in enumerate(docs, 1):
        score = task.process(scorer, doc)
        if not all(math.isfinite(v) for v in score.values()):
            raise UserError(f"{task.name} document {number}: non-finite log-likelihood: check the model's weights")
        scores.append(score)
        if bar:
            bar.update(1, **{"tok/s": (scorer.tokens - tokens) / (time.perf_counter() - start)})
    if bar:
        bar.close()
    return TaskResult(task.aggregate(scores), len(docs), scorer.tokens - tokens, time.perf_counter() - start)


def run_tasks(model, tokenizer, tasks=DEFAULT_TASKS, limit=None, task_limits=None, data_dir=None, window=1024,
              stride=None, mode="batched", lengths=None, label="", progress=True) -> dict:
    """{task name: TaskResult}; `task_limits` ({name: n}) overrides `limit` (documents per task);
    `lengths` (tokens) those of the retrieval tasks' prompts."""
    task_objects, root = resolve_tasks(tasks, data_dir, lengths)
    scorer = Scorer(model, tokenizer, mode=mode, window=window, stride=stride)
    limits = task_limits or {}
    training = model.training
    model.eval()  # no dropout (LoRA's) while scoring; restored after
    try:
        return {
            t.name: run_task(t, scorer, root, limits.get(t.name, limit), f"{label}{t.name}", progress)
            for t in task_objects
        }
    finally:
        model.train(training)


def evaluate(model, tokenizer, tasks=DEFAULT_TASKS, limit=None, data_dir=None, **options) -> dict:
    """{task: {metric: value}}, e.g. {"piqa": {"acc": .., "acc_norm": ..}, "wikitext2": {"ppl": ..}}.

    Works on any model in memory (a converted folder's, or one being trained); options as
    in `run_tasks` (task_limits, window, stride, mode, lengths, label, progress).
    """
    results = run_tasks(model, tokenizer, tasks, limit, data_dir=data_dir, **options)
    return {name: r.metrics for name, r in results.items()}

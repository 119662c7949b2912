"""`mlx_linear eval`."""

import time

import click

from ..cli import log
from ..errors import UserError
from ..files import write_json

from .runner import DEFAULT_TASKS
from .scoring import MODES


def parse_limits(values):
    """`--limit 200 --limit wikitext2=8` -> (200, {"wikitext2": 8})."""
    limit, per_task = None, {}
    for value in values:
        name, _, n = value.rpartition("=")
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--limit {value}: expected N or TASK=N with N >= 1")
        if name:
            per_task[name] = int(n)
        else:
            limit = int(n)
    return limit, per_task


def parse_lengths(value):
    """`--lengths 1k,4k,8192` -> (1024, 4096, 8192): tokens, k = 1024 (as in acc@1k)."""
    lengths = []
    for part in value.split(","):
        part = part.strip().lower()
        digits = part.removesuffix("k")
        if not digits.isdigit() or int(digits) < 1:
            raise UserError(f"--lengths {value}: expected token counts like 1k,4k or 1024,4096")
        lengths.append(int(digits) * (1024 if part.endswith("k") else 1))
    return tuple(sorted(set(lengths)))


def run(label, folder, adapter, options, verbose, use_state=True):
    import mlx_linear

    from .runner import run_tasks

    log(f"{label}: loading {folder}" + (f" with adapter {adapter}" if adapter else ""))
    model, tokenizer = mlx_linear.load(folder, adapter_path=adapter)
    if not use_state:
        if not hasattr(model, "use_state"):
            raise UserError(f"--no-state: {folder} has no linearized layers (converted with --method none?)")
        model.use_state(False)
    results = run_tasks(model, tokenizer, label=f"{label} ", **options)
    if verbose:
        for name, r in results.items():
            log(
                f"{label} {name}: {r.documents} docs, {r.tokens} tokens in {r.seconds:.1f}s "
                f"({r.documents / r.seconds:.2f} docs/s, {r.tokens / r.seconds:.0f} tok/s)"
            )
    return results


@click.command(name="eval")
@click.option("--model", "model_path", required=True, type=click.Path(file_okay=False), help="Converted model folder.")
@click.option("--baseline", type=click.Path(file_okay=False), help="Folder to compare with (e.g. the original).")
@click.option("--adapter", type=click.Path(file_okay=False), help="LoRA adapter folder for --model.")
@click.option("--baseline-adapter", type=click.Path(file_okay=False), help="LoRA adapter folder for --baseline.")
@click.option("--tasks", default=",".join(DEFAULT_TASKS), show_default=True, help="Comma-separated task names.")
@click.option("--limit", multiple=True, help="Documents per task: N, or TASK=N for one task (repeatable). [all]")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Local data folder [$MLX_LINEAR_DATA; else the Hugging Face hub, cached].")
@click.option("--lengths", help="Prompt lengths in tokens of passkey and the RULER tasks, comma-separated, "
              "e.g. 1k,4k,8192. [each task's own]")
@click.option("--window", default=1024, show_default=True, type=click.IntRange(2), help="Perplexity window (tokens).")
@click.option("--stride", type=click.IntRange(1), help="Perplexity stride (< window: overlapping windows). [window]")
@click.option("--scoring", default="batched", show_default=True, type=click.Choice(MODES),
              help="Choices from one branched context cache as a batch, one by one, or rerun from scratch.")
@click.option("--no-state", is_flag=True,
              help="Also run --model with its recurrent state off (the window branch alone): what the state adds.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--verbose", is_flag=True, help="Per-task documents, tokens and speed on stderr.")
def eval_command(model_path, baseline, adapter, baseline_adapter, tasks, limit, data_dir, lengths, window, stride,
                 scoring, no_state, output, verbose):
    """Zero-shot tasks and perplexity, scored like lm-evaluation-harness; with --baseline, side by side."""
    from ..output_checks import check_writable, disk_full_error
    from .report import RECOVERY_NOTE, STATE_NOTE, compare, markdown_table, state_share, state_table
    from .runner import resolve_tasks

    if output:
        check_writable(output)  # before the run, not after it
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks is empty: name one or more of {', '.join(DEFAULT_TASKS)}, comma-separated")
    limit, per_task = parse_limits(limit)
    unknown = sorted(set(per_task) - set(names))
    if unknown:
        raise UserError(f"--limit {unknown[0]}=...: {unknown[0]} is not in --tasks")
    if stride is not None and stride > window:
        raise UserError(f"--stride {stride} is larger than --window {window}: use a stride <= window")
    lengths = parse_lengths(lengths) if lengths else None
    resolve_tasks(names, data_dir, lengths)  # unknown tasks and missing data fail before any model loads
    options = dict(tasks=names, limit=limit, task_limits=per_task, data_dir=data_dir, window=window, stride=stride,
                   mode=scoring, lengths=lengths)
    start = time.perf_counter()
    results = {"model": run("model", model_path, adapter, options, verbose)}
    if no_state:
        results["state_off"] = run("state off", model_path, adapter, options, verbose, use_state=False)
    if baseline:
        results["baseline"] = run("baseline", baseline, baseline_adapter, options, verbose)
    metrics = {k: {t: r.metrics for t, r in v.items()} for k, v in results.items()}
    click.echo(markdown_table(metrics["model"], metrics.get("baseline")))
    if no_state:
        click.echo("\n" + state_table(metrics["model"], metrics["state_off"], metrics.get("baseline")))
    if output:
        data = dict(metrics)
        if baseline:
            data.update(compare(metrics["model"], metrics["baseline"]), note=RECOVERY_NOTE)
        if baseline and no_state:
            data.update(state_share=state_share(metrics["model"], metrics["state_off"], metrics["baseline"]),
                        state_note=STATE_NOTE)
        data["config"] = {
            "model": model_path, "adapter": adapter, "baseline": baseline, "baseline_adapter": baseline_adapter,
            "no_state": no_state,
            **{k: v for k, v in options.items() if k != "data_dir"}, "data_dir": str(data_dir or ""),
            "documents": {t: r.documents for t, r in results["model"].items()},
        }
        data["timing"] = {
            k: {t: {"seconds": r.seconds, "tokens": r.tokens} for t, r in v.items()} for k, v in results.items()
        }
        data["timing"]["total_seconds"] = time.perf_counter() - start
        try:
            write_json(output, data)
        except OSError as e:  # the table above still holds the results
            raise disk_full_error(output, e) from None
        log(f"wrote {output}")

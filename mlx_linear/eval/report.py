"""A model's metrics beside a baseline's: differences, recovery ratios, a markdown table."""

from .tasks import TASKS, lower_is_better, mean

RECOVERY_NOTE = (
    "recovery = model / baseline; for perplexity baseline / model. 1.0 = the baseline's score. "
    "average = mean of each task's primary metric (acc_norm for ARC-Challenge and HellaSwag, acc elsewhere)."
)

STATE_NOTE = (
    "state off = the same model with its recurrent state switched off (the window branch alone). "
    "state share = (model - state off) / (baseline - state off): the part of the window-only model's gap "
    "to the baseline that the state closes (1.0 = all of it; 0 = the state adds nothing)."
)


def ratio(metric, model, baseline):
    """How much of the baseline the model keeps; perplexity inverted so that 1.0 = full recovery."""
    if lower_is_better(metric):
        model, baseline = baseline, model
    return model / baseline if baseline else None


def average(results):
    """Mean of the primary metrics of the tasks that have one (accuracies), or None."""
    values = [m[TASKS[t].primary] for t, m in results.items() if t in TASKS and TASKS[t].primary in m]
    return mean(values) if values else None


def compare(model, baseline):
    """{"recovery": {task: {metric: ratio}}, "average": {...}} for two results of `evaluate`."""
    recovery = {
        task: {k: ratio(k, v, baseline[task][k]) for k, v in metrics.items() if k in baseline.get(task, {})}
        for task, metrics in model.items()
    }
    avg = {"model": average(model), "baseline": average(baseline)}
    avg["recovery"] = avg["model"] / avg["baseline"] if avg["model"] is not None and avg["baseline"] else None
    return {"recovery": recovery, "average": avg}


def number(value, metric="", sign=""):
    if value is None:
        return "-"
    if lower_is_better(metric):
        return f"{value:{sign},.2f}" if abs(value) < 1e4 else f"{value:{sign},.0f}"
    return f"{value:{sign}.4f}"


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_table(model, baseline=None):
    """One row per task and metric; with a baseline, its value, the difference and the recovery."""
    if baseline is None:
        rows = ["| task | metric | model |", "|---|---|---|"]
        rows += [f"| {t} | {k} | {number(v, k)} |" for t, m in model.items() for k, v in m.items()]
        avg = average(model)
        if avg is not None:
            rows.append(f"| average | primary | {number(avg)} |")
        return "\n".join(rows)
    summary = compare(model, baseline)
    rows = ["| task | metric | model | baseline | difference | recovery |", "|---|---|---|---|---|---|"]
    for task, metrics in model.items():
        for k, v in metrics.items():
            b = baseline.get(task, {}).get(k)
            diff = None if b is None else v - b
            rows.append(
                f"| {task} | {k} | {number(v, k)} | {number(b, k)} | {number(diff, k, '+')} "
                f"| {percent(summary['recovery'][task].get(k))} |"
            )
    avg = summary["average"]
    if avg["model"] is not None:
        diff = avg["model"] - avg["baseline"] if avg["baseline"] is not None else None
        rows.append(
            f"| average | primary | {number(avg['model'])} | {number(avg['baseline'])} | {number(diff, sign='+')} "
            f"| {percent(avg['recovery'])} |"
        )
    return "\n".join(rows) + "\n\n" + RECOVERY_NOTE


def share(model, state_off, baseline):
    gap = baseline - state_off
    return (model - state_off) / gap if gap else None


def state_share(model, state_off, baseline):
    """{task: {metric: share}}: how much of the window-only model's gap to the baseline the state closes."""
    return {
        task: {k: share(v, state_off[task][k], baseline[task][k]) for k, v in metrics.items()
               if k in state_off.get(task, {}) and k in baseline.get(task, {})}
        for task, metrics in model.items()
    }


def state_table(model, state_off, baseline=None):
    """One row per task and metric: the model with its state on and off (and the baseline, the share)."""
    shares = state_share(model, state_off, baseline) if baseline else {}
    head = "| task | metric | state on | state off |" + (" baseline | state share |" if baseline else "")
    rows = [head, "|---" * (6 if baseline else 4) + "|"]
    for task, metrics in model.items():
        for k, v in metrics.items():
            cells = [number(v, k), number(state_off.get(task, {}).get(k), k)]
            if baseline:
                cells += [number(baseline.get(task, {}).get(k), k), percent(shares[task].get(k))]
            rows.append(f"| {task} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + STATE_NOTE

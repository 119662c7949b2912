"""A model's metrics beside a baseline's: differences, recovery ratios, a markdown table."""

from .tasks import LOWER_IS_BETTER, TASKS, mean

RECOVERY_NOTE = (
    "recovery = model / baseline; for perplexity baseline / model. 1.0 = the baseline's score. "
    "average = mean of each task's primary metric (acc_norm for ARC-Challenge and HellaSwag, acc elsewhere)."
)


def ratio(metric, model, baseline):
    """How much of the baseline the model keeps; perplexity inverted so that 1.0 = full recovery."""
    if metric in LOWER_IS_BETTER:
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
    if metric in LOWER_IS_BETTER:
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

"""PNG plots of results (matplotlib, optional: `pip install matplotlib`)."""

from pathlib import Path

from .files import atomic_file


def line_plot(path, panels, title=""):
    """panels: [{"x": label, "y": label, "series": {name: (xs, ys)}, "logx": bool, "logy": bool}].

    Returns the path written, or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
        ax.set_xlabel(panel["x"])
        ax.set_ylabel(panel["y"])
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path

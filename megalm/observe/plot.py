"""Curves people would rather see than read: ``loss.png`` of a run, and ``megalm plot`` of several
runs' metrics on one figure (one panel per metric, one line per run)."""

from __future__ import annotations

from pathlib import Path

from megalm.observe.metrics import read_metrics

DEFAULT_METRICS = ["loss", "tokens_per_s", "mfu", "mem_peak_gb"]
LABELS = {"loss": "cross-entropy (nats/token)", "tokens_per_s": "tokens/s", "tflops_per_gpu": "TFLOP/s per GPU",
          "mfu": "MFU", "mem_peak_gb": "peak memory (GB)", "data_wait_fraction": "share of step time waiting for data"}


def plot_runs(run_dirs: list[Path], metrics: list[str], out: Path, title: str = "") -> Path | None:
    """One panel per metric that any run logged; the loss panel also shows validation loss. Returns
    the PNG written, or None when no run logged any of ``metrics``."""
    import matplotlib.pyplot as plt

    fig = figure({Path(d): read_metrics(Path(d)) for d in run_dirs}, metrics, title)
    if fig is None:
        return None
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def figure(runs: dict[Path, list[dict]], metrics: list[str], title: str = ""):
    """The matplotlib figure of ``plot_runs`` (None when no run logged any of ``metrics``)."""
    shown = [m for m in metrics if any(r.get(m) is not None for rows in runs.values() for r in rows)]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 3.2 * len(shown)), squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], shown):
        for run_dir, rows in runs.items():
            points = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
            if points:
                line, = ax.plot(*zip(*points), label=f"{run_dir.name} train" if metric == "loss" else run_dir.name)
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if metric == "loss" and val:
                ax.plot(*zip(*val), "o--", color=line.get_color() if points else None, label=f"{run_dir.name} validation")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title or ", ".join(d.name for d in runs))
    fig.tight_layout()
    return fig


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: training loss per logged step, validation loss per evaluation."""
    return plot_runs([run_dir], ["loss"], run_dir / "loss.png", title=run_dir.name)

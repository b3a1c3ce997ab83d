"""Curves people would rather see than read: ``loss.png`` of a run, ``megalm plot`` of several
runs' metrics on one figure (one panel per metric, one line per run), and the figures of benchmark
results (``megalm plot --bench``): kernel throughput against size, one panel per op and pass, one line
per implementation; ``megalm bench train``'s variants as bars of tokens/s, MFU and peak memory."""

from __future__ import annotations

import json
from pathlib import Path

from megalm.errors import UsageError
from megalm.observe.metrics import read_metrics

DEFAULT_METRICS = ["loss", "tokens_per_s", "mfu", "mem_peak_gb"]
LABELS = {"loss": "cross-entropy (nats/token)", "tokens_per_s": "tokens/s", "tflops_per_gpu": "TFLOP/s per GPU",
          "mfu": "MFU", "mem_peak_gb": "peak memory (GB)", "data_wait_fraction": "share of step time waiting for data"}


def plot_runs(run_dirs: list[Path], metrics: list[str], out: Path, title: str = "") -> Path | None:
    """One panel per metric that any run logged; the loss panel also shows validation loss. Returns
    the PNG written, or None when no run logged any of ``metrics``."""
    fig = figure({Path(d): read_metrics(Path(d)) for d in run_dirs}, metrics, title)
    if fig is None:
        return None
    fig.savefig(out, dpi=120)
    return out


def figure(runs: dict[Path, list[dict]], metrics: list[str], title: str = ""):
    """The matplotlib figure of ``plot_runs`` (None when no run logged any of ``metrics``)."""
    shown = [m for m in metrics if any(r.get(m) is not None for rows in runs.values() for r in rows)]
    if not shown:
        return None
    fig, axes = _panels(len(shown), sharex=True)
    for ax, metric in zip(axes, shown):
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
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or ", ".join(d.name for d in runs))
    fig.tight_layout()
    return fig


def _panels(count: int, sharex: bool = False):
    """A figure of ``count`` panels stacked, in the style of every megalm figure; (figure, axes).
    A bare ``Figure``, not pyplot's: no global state to close, and no GUI backend to import (half a
    second at the end of every run)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2 * count))
    axes = fig.subplots(count, 1, squeeze=False, sharex=sharex)
    return fig, list(axes[:, 0])


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: training loss per logged step, validation loss per evaluation."""
    return plot_runs([run_dir], ["loss"], run_dir / "loss.png", title=run_dir.name)


# ------------------------------------------------------------------------------ benchmarks

TRAIN_BARS = [("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("mem_peak_gb", "peak memory (GB)")]


def plot_bench(results: Path, out: Path | None = None) -> Path:
    """The figure of a ``megalm bench train`` result file, written beside it (``out``: elsewhere).
    (Kernel results are drawn by their own benchmark, megalm_kernels.bench, as it writes them.)"""
    data = json.loads(Path(results).read_text())
    rows = data.get("rows") or [{}]
    if "variant" not in rows[0]:
        raise UsageError(f"{results}: not the results of megalm bench train (no variants to draw); kernel results "
                         f"come drawn by megalm bench kernels itself, beside them")
    out = Path(out) if out else Path(results).with_suffix(".png")
    save_bench(data["rows"], out, data["meta"])
    return out


def save_bench(rows: list[dict], out: Path, meta: dict) -> None:
    """Draw ``megalm bench train`` rows to ``out`` (the ``plot`` hook of write_results)."""
    train_bench_figure(rows, meta).savefig(out, dpi=120)


def _bench_title(meta: dict) -> str:
    return f"{meta['device']} · torch {meta['torch']} · {str(meta.get('git_commit', ''))[:12]}"


def train_bench_figure(rows: list[dict], meta: dict):
    """One bar per variant in each panel: tokens/s, MFU (left out where no variant has one: CPUs),
    peak memory."""
    shown = [(key, label) for key, label in TRAIN_BARS if any(r.get(key) is not None for r in rows)]
    fig, axes = _panels(len(shown), sharex=True)
    names = [r["variant"] for r in rows]
    for ax, (key, label) in zip(axes, shown):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title(f"bench train {meta.get('config', '')}: {_bench_title(meta)}")
    fig.tight_layout()
    return fig



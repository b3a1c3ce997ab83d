"""Where training metrics go: metrics.jsonl, the console progress bar, wandb (loss.png: megalm.observe.plot).

Only rank 0 writes. wandb is optional: used when installed and ``train.wandb.mode`` is not
``disabled``, offline unless the user asks for online.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import psutil
import torch
import xxhash

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megalm.config import Config
from megalm.records import atomic_write_text

log = logging.getLogger("megalm")


def finite(row: dict) -> dict:
    """``row`` with each non-finite number (a NaN loss, an infinite gradient norm) as None, and a
    ``nonfinite`` field naming those fields: JSON has no NaN or Infinity, and Python's bare ``NaN``
    breaks strict readers (jq, JavaScript, pandas' ``lines=True`` loader)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad} if bad else row


def metrics_line(row: dict) -> str:
    """One line of metrics.jsonl: strict JSON (see ``finite``); a non-finite number that gets past
    ``finite`` (nested) fails here, loudly, instead of being written."""
    return json.dumps(finite(row), allow_nan=False) + "\n"


class MetricsSink:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (strict JSON: ``metrics_line``)
    and mirrors it to wandb."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = _start_wandb(cfg, run_dir) if enabled else None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(metrics_line(row))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: Config, run_dir: Path):
    if cfg.train.wandb.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.info("wandb: not installed; metrics go to metrics.jsonl only (pip install 'megalm[wandb]')")
        return None
    mode = cfg.train.wandb.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").exists()):
        log.warning("wandb: online mode asked for but no API key is configured; logging offline")
        mode = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.train.wandb.project, dir=str(run_dir), mode=mode, config=cfg.to_dict(),
                     name=run_dir.name, resume="allow")
    log.info("wandb: logging %s to %s", mode, run_dir / "wandb")
    return run


class ProgressBar:
    """A console bar with step, loss, lr, tokens/s, MFU (where the GPU's peak is known) and ETA (rank 0,
    when train.progress is on)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"
                           "{task.fields[mfu]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), refresh_per_second=4)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", mfu="")
            self.bar.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tokens_per_s:,.0f}",
                            mfu=bar_mfu(mfu))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def bar_mfu(mfu: float | None) -> str:
    """The progress bar's MFU field: nothing where it is unknown (CPUs, GPUs not in megalm's table)."""
    return "" if mfu is None else f"  MFU {100 * mfu:.1f}%"


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line cut short (the process was killed mid-write) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("metrics: left out a torn line of %s: %r", path, line[:80])
    return rows


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """On resume from ``step``: rows logged after it came from work the checkpoint lost."""
    path = run_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
    if path.is_file():
        atomic_write_text(path, "".join(metrics_line(r) for r in rows))


class Throughput:
    """Tokens per second over the steps since the last report."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


HASH_BITS = 40  # per sequence: sums over a million sequences stay exact in an int64


def peak_memory_gb() -> float:
    """This process's peak memory since ``start_memory_peak``: the CUDA allocator's on a GPU, the
    resident set's high-water mark on a CPU (Linux)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None)
        if hwm is not None:
            return int(hwm.split()[1]) * 1024 / 1e9  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def start_memory_peak() -> float:
    """Start measuring the peak afresh (start-up, e.g. building DeepSpeed's ops, can peak higher
    than training on a CPU) and return the memory in use now, measured as the peak is."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 1e9
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the resident set's high-water mark
    except OSError as e:
        log.info("memory: cannot reset the peak resident set (%s); mem_peak_gb includes start-up", e)
    return psutil.Process().memory_info().rss / 1e9


def data_hash(micro_batches: list[torch.Tensor]) -> int:
    """An order-free fingerprint of a set of token sequences: the sum of their hashes. Summed over
    ranks it names the global batch whatever the layout, so two runs (or a run and its resume)
    trained on the same data exactly when their ``data_hash`` columns agree."""
    return sum(xxhash.xxh3_64_intdigest(row.numpy().tobytes()) & ((1 << HASH_BITS) - 1)
               for batch in micro_batches for row in batch)

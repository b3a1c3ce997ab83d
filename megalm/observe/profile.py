"""``train.profile``: torch profiler traces of chosen steps on chosen ranks.

Steps ``a..b`` (``train.profile.steps=[a,b]``) are recorded with ``torch.profiler`` (CPU, and CUDA
kernels on a GPU; allocations too with ``train.profile.memory``), each step inside a
``megalm step N`` range. The trace is written as Chrome/Perfetto JSON to
``RUN_DIR/profile/trace-rank{R}.json`` (open it in https://ui.perfetto.dev or chrome://tracing), and
the operators and kernels that took the most time are logged and kept beside it (``top-rank{R}.txt``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from megalm.config import ProfileConfig

log = logging.getLogger("megalm")
TOP_ROWS = 15


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, rank: int, run_dir: Path, device: torch.device):
        self.first, self.last = (cfg.steps or [0, -1])
        self.active = bool(cfg.steps) and rank in cfg.ranks
        self.memory, self.device, self.rank = cfg.memory, device, rank
        self.path = run_dir / "profile" / f"trace-rank{rank}.json"
        self._prof = None

    @contextlib.contextmanager
    def step(self, step: int):
        """Around one training step: records it when it is one of the profiled steps."""
        if not self.active or not self.first <= step <= self.last:
            yield
            return
        if self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities, profile_memory=self.memory, record_shapes=self.memory)
            self._prof.start()
        with record_function(f"megalm step {step}"):
            yield
        if step == self.last:
            self._finish()

    def _finish(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.path))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=sort, row_limit=TOP_ROWS)
        (self.path.parent / f"top-rank{self.rank}.txt").write_text(table + "\n")
        log.info("profile: steps %d-%d on rank %d: trace %s; top operators by %s:\n%s", self.first, self.last,
                 self.rank, self.path, sort.replace("_", " "), table)
        self._prof = None

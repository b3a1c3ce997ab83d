"""When to roll a run back: a loss spike, or too many non-finite steps in a row.

Every rank sees the same per-step loss (the mean over ranks, carried by the collective the loop
makes each step anyway: preemption.py ``StopFlag.agreed``), so every rank decides the same. A
spike is a loss above ``train.spike.factor`` times the median of the last ``train.spike.window``
steps' losses, judged once ``train.spike.warmup`` steps have trained (the loss falls fast at first).
``train.max_nonfinite`` skipped (non-finite) steps in a row are an anomaly too: skipping alone is
not getting anywhere. The trainer then reloads the newest checkpoint before the anomaly and skips
the anomalous steps' data (trainer.py ``roll_back``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from megalm.config import Config


@dataclass(frozen=True)
class Anomaly:
    steps: list[int]  # the steps that led to it: their data is skipped after the rollback
    reason: str

    @property
    def first(self) -> int:
        return self.steps[0]


class AnomalyWatch:
    def __init__(self, cfg: Config):
        self.spike, self.max_nonfinite = cfg.train.spike, cfg.train.max_nonfinite
        self.losses: list[tuple[int, float]] = []  # (step, loss) of the last steps taken
        self.nonfinite: list[int] = []  # the current run of non-finite steps

    def observe(self, step: int, loss: float, skipped: bool) -> Anomaly | None:
        """Step ``step`` ended with mean loss ``loss`` (``skipped``: its update was skipped)."""
        if skipped or not math.isfinite(loss):
            self.nonfinite.append(step)
            if len(self.nonfinite) >= self.max_nonfinite:
                return Anomaly(list(self.nonfinite), f"{len(self.nonfinite)} non-finite steps in a row "
                                                     f"(train.max_nonfinite={self.max_nonfinite})")
            return None
        self.nonfinite.clear()
        recent = [value for _, value in self.losses[-self.spike.window:]]
        if self.spike.factor and step > self.spike.warmup and recent:
            median = statistics.median(recent)
            if loss > self.spike.factor * median:
                return Anomaly([step], f"a loss spike: {loss:.4g} is above {self.spike.factor:g} x the median "
                                       f"{median:.4g} of the last {len(recent)} steps (train.spike.factor)")
        self.losses = [*self.losses[-self.spike.window:], (step, loss)]
        return None

    def rolled_back(self, step: int) -> None:
        """Training goes on from step ``step``: what came after it did not happen."""
        self.losses = [(s, value) for s, value in self.losses if s <= step]
        self.nonfinite.clear()

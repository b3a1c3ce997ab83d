"""Slow ranks named: which rank holds the others up, by how much, and a warning when it keeps on.

A collective makes every rank's wall time equal: the ranks that are ready wait inside it for the
last one. So a straggler shows only in each rank's *own* time per step, the step's wall time less
the time it spent blocked in collectives (parallel/collectives.py): compute, data loading and
anything else the rank does by itself. The per-step reduction the loop makes anyway
(preemption.py ``StopFlag.agreed``) carries every rank's own time to every rank, so every rank sees
the same numbers at no extra synchronisation.

A rank is compared with the other ranks of its pipeline stage (which do the same work: the first
and last stages also embed and score, and are not slow for that): its lag is its own time less
their median. A rank whose own time is ``train.straggler.ratio`` times that median or more for
``train.straggler.steps`` steps in a row is named in one warning line, with its host and device;
again only once it has recovered and slowed down anew. ``metrics.jsonl`` gets the interval's
``slowest_rank`` and its mean lag (``slowest_rank_lag_s``).
"""

from __future__ import annotations

import math
import statistics


class StragglerWatch:
    def __init__(self, ratio: float, steps: int, stage_of: list[int], where: list[str]):
        """``stage_of[r]``: rank r's pipeline stage; ``where[r]``: its host and device, in words."""
        self.ratio, self.steps, self.where = ratio, steps, where
        self.peers = [[q for q, stage in enumerate(stage_of) if stage == stage_of[r] and q != r]
                      for r in range(len(stage_of))]
        self.streak = [0] * len(stage_of)  # steps in a row each rank was over the ratio
        self.lag_sums = [0.0] * len(stage_of)
        self.observed = 0

    def observe(self, step: int, own_s: list[float]) -> str | None:
        """Every rank's own time in step ``step``; the warning line when a rank just became a straggler."""
        if len(own_s) < 2 or not all(math.isfinite(t) for t in own_s):
            return None  # one rank has nobody to be slower than; a step whose data was skipped trained nothing
        self.observed += 1
        warning = None
        for r, own in enumerate(own_s):
            if not self.peers[r]:
                continue
            typical = statistics.median(own_s[q] for q in self.peers[r])
            self.lag_sums[r] += own - typical
            slow = self.ratio > 0 and own >= self.ratio * typical
            self.streak[r] = self.streak[r] + 1 if slow else 0
            if self.streak[r] == self.steps and warning is None:
                warning = (f"rank {r} ({self.where[r]}) is a straggler: its own time (compute and data, not waiting in "
                           f"collectives) has been at least {self.ratio:g} x that of the other ranks of its pipeline "
                           f"stage for {self.steps} steps in a row, up to step {step}: {own:.3f} s against "
                           f"{typical:.3f} s; every other rank waits for it at each collective "
                           f"(train.straggler.ratio, train.straggler.steps)")
        return warning

    def interval(self) -> dict:
        """The slowest rank since the last call, and its mean lag over the steps observed (seconds)."""
        if not self.observed:
            return {}
        slowest = max(range(len(self.lag_sums)), key=lambda r: self.lag_sums[r])
        fields = {"slowest_rank": slowest, "slowest_rank_lag_s": self.lag_sums[slowest] / self.observed}
        self.lag_sums, self.observed = [0.0] * len(self.lag_sums), 0
        return fields

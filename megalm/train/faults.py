"""Faults injected on purpose, to see what a run does with them (tests, and a user rehearsing a
recovery): ``MEGALM_FAULTS`` in the environment of ``megalm train`` lists them, comma-separated, as
``KIND@STEPS`` or ``KIND@STEPS:rank=R`` (only global rank R; default every rank), where STEPS is
one step or a range ``FIRST-LAST``:

- ``nan@5``: step 5's loss is NaN (as a poisoned batch or an overflowing layer gives), so are its
  gradients;
- ``inf@5``: step 5's loss is infinite, its gradients infinite or NaN;
- ``scale=1e30@5``: step 5's loss and gradients are multiplied by 1e30: finite, but whether their
  norm overflows depends on how an optimizer path sums it; ``scale=20@5``: a loss spike, 20 times
  the usual loss;
- ``slow=0.2@1-50:rank=2``: rank 2 spends 0.2 s more on each of steps 1 to 50, after reading its
  data and before its forward and backward (a straggler: a throttled GPU, a noisy neighbour);
- ``mismatch@7:rank=1``: rank 1 makes one all-reduce the others do not make, at the start of step
  7 (a bug that desynchronises the collectives: the run hangs, and the watchdog shows where).

Loss faults multiply the loss scale the trainer hands its loss function (trainer.py ``_account``),
so they go through exactly the arithmetic a real fault would; the others happen in ``disturb``,
called at the start of each step's compute. A run with faults says so at its start.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm.errors import UsageError

log = logging.getLogger("megalm")
VARIABLE = "MEGALM_FAULTS"
LOSS_FAULTS = ("nan", "inf", "scale")


@dataclass(frozen=True)
class Fault:
    kind: str  # nan, inf, scale, slow or mismatch
    value: float  # what multiplies the loss (nan, inf, scale), the seconds added (slow)
    first: int
    last: int
    rank: int | None  # None: every rank

    def at(self, step: int) -> bool:
        return self.first <= step <= self.last


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            what, _, where = item.partition("@")
            kind, _, value = what.partition("=")
            steps, _, rank_text = where.partition(":rank=")
            first, _, last = steps.partition("-")
            if kind in ("nan", "inf") and not value:
                number = float(kind)
            elif kind in ("scale", "slow") and value:
                number = float(value)
            elif kind == "mismatch" and not value:
                number = 0.0
            else:
                raise ValueError(kind)
            faults.append(Fault(kind, number, int(first), int(last or first), int(rank_text) if rank_text else None))
        except ValueError:
            raise UsageError(f"{VARIABLE}: cannot read {item!r}; expected nan@STEPS, inf@STEPS, scale=FACTOR@STEPS, "
                             f"slow=SECONDS@STEPS or mismatch@STEPS (STEPS: a step or FIRST-LAST), optionally with "
                             f":rank=R (e.g. nan@5:rank=1)") from None
    return faults


class Faults:
    """The faults of this rank, from the environment."""

    def __init__(self, rank: int):
        self.faults = [f for f in parse(os.environ.get(VARIABLE, "")) if f.rank in (None, rank)]
        if os.environ.get(VARIABLE) and rank == 0:
            log.warning("faults injected (%s): %s", VARIABLE, os.environ[VARIABLE])

    def factor(self, step: int) -> float:
        """What multiplies the loss of optimizer step ``step`` (1-based) on this rank."""
        return math.prod(f.value for f in self.faults if f.kind in LOSS_FAULTS and f.at(step))

    def disturb(self, step: int, device: torch.device) -> None:
        """This rank's stragglers and stray collectives at the start of step ``step``'s compute."""
        for f in self.faults:
            if f.at(step) and f.kind == "slow":
                time.sleep(f.value)
            elif f.at(step) and f.kind == "mismatch":
                dist.all_reduce(torch.ones(1, device=device))

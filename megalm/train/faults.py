"""Faults injected on purpose, to see what a run does with them (tests, and a user rehearsing a
recovery): ``MEGALM_FAULTS`` in the environment of ``megalm train`` lists them, comma-separated, as
``KIND@STEP`` or ``KIND@STEP:rank=R`` (only global rank R; default every rank):

- ``nan@5``: step 5's loss is NaN (as a poisoned batch or an overflowing layer gives), so are its
  gradients;
- ``inf@5``: step 5's loss is infinite, its gradients infinite or NaN;
- ``scale=1e30@5``: step 5's loss and gradients are multiplied by 1e30: finite, but whether their
  norm overflows depends on how an optimizer path sums it; ``scale=20@5``: a loss spike, 20 times
  the usual loss.

Each multiplies the loss scale the trainer hands its loss function (trainer.py ``_account``), so it
goes through exactly the arithmetic a real fault would. A run with faults says so at its start.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from megalm.errors import UsageError

log = logging.getLogger("megalm")
VARIABLE = "MEGALM_FAULTS"


@dataclass(frozen=True)
class Fault:
    factor: float
    step: int
    rank: int | None  # None: every rank


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            kind, _, where = item.partition("@")
            step_text, _, rank_text = where.partition(":rank=")
            if kind in ("nan", "inf"):
                factor = float(kind)
            elif kind.startswith("scale="):
                factor = float(kind.removeprefix("scale="))
            else:
                raise ValueError(kind)
            faults.append(Fault(factor, int(step_text), int(rank_text) if rank_text else None))
        except ValueError:
            raise UsageError(f"{VARIABLE}: cannot read {item!r}; expected nan@STEP, inf@STEP or scale=FACTOR@STEP, "
                             f"optionally with :rank=R (e.g. nan@5:rank=1)") from None
    return faults


class Faults:
    """The faults of this rank, from the environment."""

    def __init__(self, rank: int):
        self.faults = [f for f in parse(os.environ.get(VARIABLE, "")) if f.rank in (None, rank)]
        if self.faults and rank == 0:
            log.warning("faults injected (%s): %s", VARIABLE, os.environ[VARIABLE])

    def factor(self, step: int) -> float:
        """What multiplies the loss of optimizer step ``step`` (1-based) on this rank."""
        return math.prod(f.factor for f in self.faults if f.step == step)

"""Stopping on request: SIGTERM or SIGUSR1 (preemption, a job's time limit) ends training cleanly.

The handler only sets a flag; the trainer asks, once per step, whether any rank was signalled
(ranks may receive the signal at different steps), then every rank saves and stops together.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("megalm")


class StopFlag:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

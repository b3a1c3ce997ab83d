"""Stopping on request: SIGTERM, SIGUSR1 (preemption, a job's time limit) or Ctrl-C (SIGINT) ends
training cleanly, with a checkpoint.

The handler only sets a flag; the trainer asks, once per step, whether any rank was signalled
(ranks may receive the signal at different steps), then every rank saves and stops together and
the command exits with EXIT_STOPPED (75): stopped early, run the same command again to resume. A
second Ctrl-C stops at once without the save (KeyboardInterrupt, exit 130), for when the save
itself is what hangs.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("megalm")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: list[str] = []  # every stop signal this process received while training


def stop_requested() -> bool:
    """Whether this process was asked to stop (while a failure is reported, it then ends at once)."""
    return bool(_received)


class StopFlag:
    def __init__(self):
        self.requested: str | None = None  # the name of the first stop signal received
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        log.warning("received %s: will checkpoint and stop after this step%s", name,
                    " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self.requested = self.requested or name
        _received.append(name)

    def agreed(self, device: torch.device, loss: float, own_s: float) -> tuple[bool, float, list[float]]:
        """Collective, once per step: whether any rank was signalled (then every rank is told). The
        same reduction carries, at no extra cost, this step's ``loss`` averaged over the ranks (for
        the anomaly watch: rollback.py) and every rank's own time ``own_s`` (for the straggler
        watch: observe/stragglers.py)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        sums = torch.zeros(2 + world, dtype=torch.float64)
        sums[0], sums[1], sums[2 + rank] = float(self.requested is not None), loss, own_s
        sums = sums.to(device)
        dist.all_reduce(sums)
        signalled, total, *own = sums.tolist()
        return signalled > 0, total / world, own

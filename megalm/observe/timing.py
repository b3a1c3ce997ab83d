"""Where a step's time goes: data, forward, backward (with the gradient all-reduce, which DeepSpeed
runs inside it), optimizer. Measured on the logged steps only: on a GPU each phase boundary waits
for the device (kernels run asynchronously, so without that the time lands in whichever phase
happens to wait next), and that wait would slow every step."""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self.seconds: dict[str, float] = {}

    def start_step(self, measure: bool) -> None:
        self.enabled, self.seconds = measure, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

"""Host copies of live training tensors, taken while training goes on.

A save copies what a rank writes into a host buffer (``Staging``), so that a writer thread can
save the copy while the next step runs; the newest save is also held whole in host memory for a
rollback (held.py). Either way the buffer is allocated once and reused, is pinned when the tensors
live on a GPU, and the copy runs in the writer's thread, overlapping the next step's forward and
backward (which read the weights but do not change them): only that step's optimizer update waits
for it (``Snapshot.wait``).
"""

from __future__ import annotations

import threading
import time

import torch


class Staging:
    """A float32 host buffer holding copies of lists of live tensors (flattened, one after another);
    16-bit values widen exactly."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self._views: list[list[torch.Tensor]] = []
        self._sizes: list[list[int]] = []
        self._snapshot: Snapshot | None = None
        self._after = None  # a CUDA event: the compute stream's work the copy must not overtake
        self._device = None

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * 4

    def start(self, views: list[list[torch.Tensor]]) -> Snapshot:
        """Take the live tensors (no copy yet: ``finish`` copies)."""
        self._views, self._sizes = views, [[v.numel() for v in group] for group in views]
        total = sum(sum(sizes) for sizes in self._sizes)
        cuda = [v.device for group in views for v in group if v.device.type == "cuda"]
        if self.buffer is None or self.buffer.numel() != total:
            self.buffer = torch.empty(total, dtype=torch.float32, pin_memory=bool(cuda))
        self._after = self._device = None
        if cuda:
            self._device = cuda[0]
            self._after = torch.cuda.Event()
            self._after.record()  # on the current (compute) stream
        self._snapshot = Snapshot()
        return self._snapshot

    @torch.no_grad()
    def finish(self) -> None:
        """Copy the tensors into the buffer (in the writer's thread)."""
        try:
            if self._after is None:
                self._copy()
            else:  # on a side stream of the tensors' GPU, after the work queued before the save
                with torch.cuda.device(self._device):
                    stream = torch.cuda.Stream()
                    stream.wait_event(self._after)
                    with torch.cuda.stream(stream):
                        self._copy()
                    stream.synchronize()
        finally:
            self._views = []
            self._snapshot.done.set()

    def _copy(self) -> None:
        for group, copies in zip(self._views, self.copies()):
            for values, copy in zip(group, copies):
                copy.copy_(values.reshape(-1), non_blocking=True)

    def copies(self) -> list[list[torch.Tensor]]:
        """The buffer's flat copy of each tensor given to ``start``, grouped as given."""
        out, offset = [], 0
        for sizes in self._sizes:
            group = []
            for n in sizes:
                group.append(self.buffer[offset:offset + n])
                offset += n
            out.append(group)
        return out

    def abandon(self) -> None:
        """A save failed: nobody may wait for its copy any more."""
        if self._snapshot is not None:
            self._snapshot.done.set()


class Snapshot:
    """The copy of one save; ``wait`` blocks until it is complete, returning the seconds waited."""

    def __init__(self):
        self.done = threading.Event()

    def wait(self) -> float:
        started = time.perf_counter()
        self.done.wait()
        return time.perf_counter() - started

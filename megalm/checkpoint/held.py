"""The newest save, also held in host memory by every rank, so that a rollback to it reads no file.

A rollback (megalm/train/rollback.py) most often goes back to the checkpoint just saved. A rank's
files hold only what it writes (tensor- and data-parallel replicas write nothing), and under ZeRO
1/2 its 16-bit weights are whole while its fp32 masters are a fragment, so putting a checkpoint
back from files takes every rank's reads and the gathers that reassemble them. Instead, each save
also copies everything this rank holds into a host buffer of its own: each local parameter's
master fragment and Adam moments, the whole 16-bit weights where the fragments do not cover them
(ZeRO 1/2), Adam's step and the parts' states. Putting that back is local, on every layout. The
copy is made in the writer's thread (staging.py), so training waits for it only at the next
optimizer update, and the save writes its files from it: what a rank writes is a part of what it
holds, so the save needs no copy of its own. ``train.rollback_copy=false`` goes without (a
rollback then reads the checkpoint's files, and a save stages its own copy); so does a host
without the memory for it, saying so.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import psutil
import torch

from megalm.checkpoint.fragments import Slot, ensure_optimizer_state, local_slots
from megalm.checkpoint.shards import KINDS
from megalm.checkpoint.staging import Snapshot, Staging

log = logging.getLogger("megalm.checkpoint")


class HeldSave:
    """This rank's copy of the newest save (``step``: its step, None until one is complete)."""

    def __init__(self, engine, mesh, names: dict):
        self.engine, self.mesh, self.names = engine, mesh, names
        self.staging = Staging()
        self.step: int | None = None
        self.refused: str | None = None  # why this host holds no copy
        self._pending = self._state = None
        self._names: list[str] = []  # the parameter each group of the copy belongs to

    def start(self, step: int, adam: int, shared: dict, parts: dict, spare: int = 0) -> Snapshot | None:
        """At a save, in the training thread: take the live tensors (``finish`` copies them). None
        when this host has not the memory for the copy (``spare``: bytes per rank that holding it
        frees)."""
        self.step = None
        slots = self._slots()
        views = [_views(slot) for slot in slots]
        nbytes = 4 * sum(v.numel() for group in views for v in group)
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available = psutil.virtual_memory().available + (self.staging.nbytes + spare) * ranks_here
        if nbytes * ranks_here > available / 2:
            self.refused = (f"it needs {nbytes / 1e6:.1f} MB per rank x {ranks_here} ranks on this host, and only "
                            f"{available / 1e6:.0f} MB of host memory are free")
            self.staging.buffer = None
            return None
        self.refused = None
        self._names = [slot.fragment.name for slot in slots]
        self._pending = (step, adam, copy.deepcopy(shared), copy.deepcopy(parts))
        return self.staging.start(views)

    def finish(self) -> None:
        """In the writer's thread, before the save's own copy lets training go on."""
        self.staging.finish()
        self.step, *self._state = self._pending

    def written(self, names: list[str]) -> list[torch.Tensor]:
        """The copy's master and moments of each parameter in ``names`` (the ones this rank's save
        writes), in the order of its data file."""
        held = dict(zip(self._names, self.staging.copies(), strict=True))
        return [values for name in names for values in held[name][:KINDS]]

    def abandon(self) -> None:
        """The save failed: its copy is no checkpoint to go back to."""
        self.step = None
        self.staging.abandon()

    @torch.no_grad()
    def put_back(self) -> tuple[dict, dict]:
        """Put this rank's weights, masters and moments back as they were at the save; returns the
        shared and per-rank parts' states to load."""
        adam, shared, parts = self._state
        ensure_optimizer_state(self.engine, adam)
        for slot, copies in zip(self._slots(), self.staging.copies(), strict=True):
            f = slot.fragment
            own, weights = (copies[:-1], copies[-1]) if slot.kind == "fragment" else (copies, None)
            n, piece = math.prod(f.shape), slice(f.start, f.start + f.numel)
            full = [weights.clone() if weights is not None else torch.zeros(n), torch.zeros(n), torch.zeros(n)]
            for whole, values in zip(full, own):
                whole[piece] = values
            slot.write(full[0], full[1:])
        return shared, parts

    def _slots(self) -> list[Slot]:
        return local_slots(self.engine, self.mesh, self.names, saving=False)


def _views(slot: Slot) -> list[torch.Tensor]:
    """What ``slot`` holds: its master fragment and moments, then (ZeRO 1/2) the whole 16-bit weights,
    which the fragment does not cover."""
    own = slot.read() if slot.fragment.numel or slot.kind != "fragment" else []
    return [*own, slot.p.data] if slot.kind == "fragment" else own

"""Saving and resuming training: every stateful part's state, sharded per rank, never torn.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000100/          one complete checkpoint:
        (DeepSpeed files)       the engine's model and optimizer shards, one set per rank
        rank_00000.pt …         each rank's own parts (e.g. its RNG streams)
        meta.json               the step, the layout, the shared parts' states, every file's size
    latest                  the name of the newest complete checkpoint

The checkpointer knows nothing of the parts' insides: it is handed the engine and two sets of
objects with ``state_dict()``/``load_state_dict()``, the *shared* parts (one state for the whole
run, e.g. step counters and the data position; ``state_dict`` may be collective) and the
*per-rank* parts (one state per rank). A checkpoint is written under a temporary name by every
rank; only after all ranks finished does rank 0 write ``meta.json``, rename the directory into
place and then move ``latest``. A directory without ``meta.json`` or whose files do not match it is
never resumed from: the search says why and falls back to the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from megalm.checkpoint.meta import CheckpointError, CheckpointMeta, Layout
from megalm.records import atomic_write_text, fsync_dir

log = logging.getLogger("megalm.checkpoint")

LATEST = "latest"
PREFIX = "step_"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class Checkpointer:
    """Saves and restores one run's engine and parts under ``RUN_DIR/checkpoints``."""

    def __init__(self, run_dir: str | Path, engine, layout: Layout, config: dict, *,
                 shared: dict[str, Stateful], per_rank: dict[str, Stateful], keep: int):
        self.root = checkpoint_root(run_dir)
        self.engine, self.layout, self.config = engine, layout, config
        self.shared, self.per_rank, self.keep = shared, per_rank, keep
        self.rank = dist.get_rank()

    def save(self, step: int) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp.{tag}"
        shared = {name: part.state_dict() for name, part in self.shared.items()}  # may be collective
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
        dist.barrier()
        self.engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        torch.save({name: part.state_dict() for name, part in self.per_rank.items()}, tmp / rank_file(self.rank))
        dist.barrier()  # every rank's files are on disk
        final = self.root / tag
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            CheckpointMeta(step=step, layout=self.layout, config=self.config, state=shared, files=files).write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, tag)
            self._apply_retention()
        dist.barrier()
        return final

    def resume(self) -> CheckpointMeta | None:
        """Collective: restore the newest complete checkpoint, if any; returns its meta."""
        found = find_resumable(self.root.parent) if self.rank == 0 else None
        gathered = [found]
        dist.broadcast_object_list(gathered, src=0)
        if gathered[0] is None:
            return None
        ckpt, meta = gathered[0]
        if meta.layout != self.layout:
            raise CheckpointError(f"{ckpt}: saved with layout {meta.layout}, this run is {self.layout}; "
                                  f"resuming on another layout is not supported yet: restart with the saved one")
        path, _ = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        for name, part in self.shared.items():
            part.load_state_dict(meta.state[name])
        mine = torch.load(ckpt / rank_file(self.rank), map_location="cpu", weights_only=False)
        for name, part in self.per_rank.items():
            part.load_state_dict(mine[name])
        log.info("resume: from %s (step %d)", ckpt, meta.step)
        return meta

    def _apply_retention(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint: removed %s (keeping the newest %d)", old.name, self.keep)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / CheckpointMeta.FILE).is_file())


def verify(ckpt: Path) -> CheckpointMeta:
    """The meta of a checkpoint whose files are all present with their recorded sizes."""
    meta = CheckpointMeta.read(ckpt)
    for name, size in meta.files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: missing {name}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: {name} is {path.stat().st_size} bytes, expected {size} (torn write?)")
    return meta


def find_resumable(run_dir: str | Path) -> tuple[Path, CheckpointMeta] | None:
    """The newest checkpoint that verifies, preferring the one ``latest`` names; None if none."""
    root = checkpoint_root(run_dir)
    candidates = list(reversed(complete_checkpoints(root)))
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            log.warning("checkpoint: %s names %s, which is not a complete checkpoint; looking for older ones",
                        latest, named.name)
    for ckpt in candidates:
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as e:
            log.warning("checkpoint: skipping %s", e)
    return None


def resolve(path: str | Path) -> Path:
    """A run dir, its checkpoints dir, or one checkpoint dir -> one verified checkpoint dir."""
    path = Path(path)
    if (path / CheckpointMeta.FILE).is_file():
        verify(path)
        return path
    for run_dir in (path, path.parent):
        found = find_resumable(run_dir) if checkpoint_root(run_dir).is_dir() else None
        if found:
            return found[0]
    raise CheckpointError(f"{path}: no complete checkpoint found (expected a run dir, its checkpoints/ "
                          f"or a {PREFIX}N directory with {CheckpointMeta.FILE})")

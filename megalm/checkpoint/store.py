"""Saving and resuming training: DeepSpeed's sharded checkpoint plus megalm's state, never torn.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000100/          one complete checkpoint (DeepSpeed files of every rank + meta.json)
    latest                  the name of the newest complete checkpoint

Each checkpoint is written under a temporary name (``.tmp.step_…``) by every rank; only after all
ranks finished does rank 0 write ``meta.json`` (step, data-loader state, config, file sizes),
rename the directory into place and then move ``latest``. A directory without ``meta.json`` or
whose files do not match it is never resumed from: the loader says why and falls back to the
previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("megalm.checkpoint")

META = "meta.json"
LATEST = "latest"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, run_dir: str | Path, step: int, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = f"{PREFIX}{step:08d}"
    tmp_tag = f".tmp.{tag}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a save that died
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    final = root / tag
    if dist.get_rank() == 0:
        files = {str(p.relative_to(root / tmp_tag)): p.stat().st_size
                 for p in sorted((root / tmp_tag).rglob("*")) if p.is_file()}
        _atomic_write(root / tmp_tag / META, json.dumps({**meta, "step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _atomic_write(root / LATEST, tag)
        _apply_retention(root, keep)
    dist.barrier()
    return final


def _apply_retention(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: removed %s (keeping the newest %d)", old.name, keep)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / META).is_file())


def verify(ckpt: Path) -> dict:
    """meta.json of a checkpoint whose files are all present with their recorded sizes."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: unreadable {META} ({e})") from None
    for name, size in meta.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: missing {name}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: {name} is {path.stat().st_size} bytes, expected {size} (torn write?)")
    return meta


def find_resumable(run_dir: str | Path) -> tuple[Path, dict] | None:
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


def load(engine, ckpt: Path) -> None:
    """Collective: restore model, optimizer, LR schedule (DeepSpeed) from a verified checkpoint."""
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")


def resolve(path: str | Path) -> Path:
    """A run dir, its checkpoints dir, or one checkpoint dir -> one verified checkpoint dir."""
    path = Path(path)
    if (path / META).is_file():
        verify(path)
        return path
    for run_dir in (path, path.parent):
        found = find_resumable(run_dir) if checkpoint_root(run_dir).is_dir() else None
        if found:
            return found[0]
    raise CheckpointError(f"{path}: no complete checkpoint found (expected a run dir, its checkpoints/ "
                          f"or a {PREFIX}N directory with {META})")


"""The checkpoints of a run on disk: which are complete, whether their files are intact, which to
resume from, which to keep.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000100/          one checkpoint, complete once it holds meta.json
    .tmp.step_00000200/     a checkpoint being written (or left by a save that died): never used
    latest                  the name of the newest complete checkpoint, moved last
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megalm.checkpoint.meta import CheckpointMeta
from megalm.common import checksum
from megalm.errors import CheckpointError

log = logging.getLogger("megalm.checkpoint")

LATEST = "latest"
PREFIX = "step_"
TMP = ".tmp."


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / CheckpointMeta.FILE).is_file())


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix(PREFIX))


def newest_before(root: Path, step: int) -> Path | None:
    """The newest complete checkpoint from before step ``step`` (what a rollback goes back to)."""
    return next((c for c in reversed(complete_checkpoints(root)) if step_of(c) < step), None)


def newest_first(root: Path) -> list[Path]:
    """The complete checkpoints to try resuming from: the one ``latest`` names, then the others,
    newest first."""
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
    return candidates


def problems(ckpt: Path, meta: CheckpointMeta, names: list[str], checksums: bool = True) -> list[str]:
    """What is wrong with the files ``names`` of a checkpoint: missing, wrong size, wrong checksum."""
    found = []
    for name in names:
        entry, path = meta.files[name], ckpt / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != entry.size:
            found.append(f"{path}: {path.stat().st_size} bytes, expected {entry.size} (torn write?)")
        elif checksums and checksum(path) != entry.xxh3:
            found.append(f"{path}: checksum {checksum(path)} differs from the recorded {entry.xxh3} (corrupt)")
    return found


def verify(ckpt: Path, checksums: bool = True) -> CheckpointMeta:
    """The meta of a checkpoint whose files are all present and intact; CheckpointError otherwise."""
    meta = CheckpointMeta.read(ckpt)
    found = problems(ckpt, meta, sorted(meta.files), checksums)
    if found:
        raise CheckpointError(found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return meta


def resolve(path: str | Path) -> Path:
    """A run dir, its checkpoints dir, or one checkpoint dir -> the checkpoint to use (the newest
    complete one; sizes checked)."""
    path = Path(path)
    if (path / CheckpointMeta.FILE).is_file():
        return path
    for root in (checkpoint_root(path), path):
        for ckpt in newest_first(root):
            try:
                verify(ckpt, checksums=False)
                return ckpt
            except CheckpointError as e:
                log.warning("checkpoint: skipping %s", e)
    raise CheckpointError(f"{path}: no complete checkpoint found (expected a run dir, its checkpoints/ "
                          f"or a {PREFIX}N directory with {CheckpointMeta.FILE})")


def resolve_verified(path: str | Path) -> tuple[Path, CheckpointMeta]:
    """The checkpoint ``path`` names (see ``resolve``) and its meta, every file checked in full
    (sizes and xxh3 checksums, as a resume checks them). Every command that reads weights to use
    them (generate, eval, classify, finetune) opens its checkpoint here, so that a flipped byte is
    an error naming the file, not NaN weights or a torch error three modules later. A damaged one is
    not replaced by an older one silently: which to use instead is the user's choice."""
    ckpt = resolve(path)
    try:
        return ckpt, verify(ckpt)
    except CheckpointError as e:
        run_dir = ckpt.parent.parent
        fix = f"give an older checkpoint of the run (`megalm ckpt list {run_dir}` shows which verify)" \
            if ckpt.parent == checkpoint_root(run_dir) else "copy or import it again"
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {e}; {fix}") from None


@dataclass
class Listing:
    path: Path
    step: int | None
    bytes: int
    layout: str
    status: str  # "ok", or why it cannot be used


def listing(run_dir: str | Path, checksums: bool = True) -> list[Listing]:
    """Every checkpoint directory of a run (complete or not), oldest first, each verified."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints/ directory")
    rows = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        try:
            meta = verify(path, checksums)
            rows.append(Listing(path, meta.step, size, str(meta.layout), "ok"))
        except CheckpointError as e:
            status = "incomplete (being written, or its save died)" if path.name.startswith(TMP) else str(e)
            rows.append(Listing(path, None, size, "?", status))
    return rows


def to_delete(root: Path, newest: int, keep_last: int, keep_every: int, protected: set[Path]) -> list[Path]:
    """Complete checkpoints that retention removes: those at or before step ``newest``, except (kept)
    the newest ``keep_last`` of them, those whose step is a multiple of ``keep_every``, and the
    ``protected`` ones. Checkpoints past ``newest`` (left by a run that was rewound) are not counted
    and not removed."""
    steps = {p: step_of(p) for p in complete_checkpoints(root)}
    mine = sorted((p for p, s in steps.items() if s <= newest), key=steps.get)
    kept = set(mine[-keep_last:]) | protected
    if keep_every:
        kept |= {p for p in mine if steps[p] % keep_every == 0}
    return [p for p in mine if p not in kept]

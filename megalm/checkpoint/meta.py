"""A checkpoint's manifest, ``meta.json``: what was saved, by which layout, and every file in it.

Rank 0 writes it last, after every rank's files are on disk; a checkpoint directory without it
(or whose files do not match it) is incomplete and never resumed from. This is the one place that
knows its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from megalm.errors import CheckpointError
from megalm.records import Record


@dataclass(frozen=True)
class Layout:
    """How the run that saved the checkpoint was split over processes."""

    tp: int
    pp: int
    dp: int
    zero_stage: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage}"


@dataclass(frozen=True)
class FileEntry:
    size: int  # bytes
    xxh3: str  # xxh3-64 of the contents, hex


@dataclass(frozen=True)
class CheckpointMeta(Record):
    FILE: ClassVar[str] = "meta.json"
    VERSION: ClassVar[int] = 3
    ERROR: ClassVar[type[Exception]] = CheckpointError

    step: int
    layout: Layout
    config: dict[str, Any]  # the resolved config of the run (megalm.config.Config.to_dict())
    state: dict[str, Any]  # each shared stateful part's state_dict, by part name ({} for an imported model)
    optimizer: bool  # holds Adam's moments (an imported model has weights only)
    tokenizer_sha256: str  # of the tokenizer.json saved with it
    files: dict[str, FileEntry]  # every other file of the checkpoint, by path relative to it
    versions: dict[str, str]  # python, torch, deepspeed, megalm
    git_commit: str  # of the megalm that wrote it
    created_utc: str
    version: int = VERSION

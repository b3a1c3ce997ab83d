"""The records of a prepared data directory: ``index.json``, how the data was made and what is in it;
and those of an unfinished ``megalm prepare``, ``progress.json`` and ``shards.jsonl``.

``megalm prepare`` writes ``index.json`` last (the directory is valid only once it exists); training
reads it to find the shards, the tokenizer and the vocabulary. ``progress.json`` (what the first pass
decided) and ``shards.jsonl`` (the shards closed so far, one line each, appended as they close: a
list of thousands is never rewritten) live only in the temporary directory of a preparation, so
that a rerun finishes it. This is the one place that knows their fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from megalm.config import DataConfig
from megalm.errors import DataError
from megalm.records import Record, atomic_write_text


@dataclass(frozen=True)
class PrepareSettings:
    """The ``data.*`` keys that determine a prepared directory's contents."""

    source: str
    tokenizer: str
    vocab_size: int
    val_fraction: float
    shard_tokens: int
    seed: int
    text_field: str
    normalize: str
    min_chars: int
    dedup: bool

    @classmethod
    def of(cls, cfg: DataConfig) -> "PrepareSettings":
        return cls(source=cfg.source, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                   val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens, seed=cfg.seed,
                   text_field=cfg.text_field, normalize=cfg.normalize, min_chars=cfg.min_chars, dedup=cfg.dedup)

    def differences(self, other: "PrepareSettings") -> dict[str, tuple]:
        """``data.KEY -> (ours, theirs)`` for the keys that change the contents."""
        ours, theirs = asdict(self), asdict(other)
        return {f"data.{k}": (v, theirs[k]) for k, v in ours.items() if theirs[k] != v}


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name inside the data directory
    samples: int  # documents
    tokens: int  # tokens of those documents (end-of-text separators not counted)
    bytes: int  # size of the tar file
    xxh3: str  # xxh3-64 of the tar file, hex: a truncated, corrupt or replaced shard is caught by it


@dataclass
class CleaningCounts:
    """What prepare left out of the source's documents and changed in the rest (see megalm.data.clean)."""

    documents_in: int = 0  # documents read from the source
    not_utf8: int = 0  # dropped: not UTF-8 text
    empty: int = 0  # dropped: nothing but whitespace after cleaning
    too_short: int = 0  # dropped: fewer than data.min_chars characters
    duplicates: int = 0  # dropped: the same cleaned text as an earlier document (data.dedup)
    documents_out: int = 0  # kept
    normalized: int = 0  # kept documents that Unicode normalization changed
    control_chars_removed: int = 0  # control characters removed from the kept documents


@dataclass(frozen=True)
class DataManifest(Record):
    FILE: ClassVar[str] = "index.json"
    VERSION: ClassVar[int] = 3
    ERROR: ClassVar[type[Exception]] = DataError
    REMEDY: ClassVar[str] = "re-run `megalm prepare --force` for this data.dir"

    settings: PrepareSettings
    source: str  # a description of where the text came from
    tokenizer: str  # file name of the HF tokenizers JSON inside the data directory
    tokenizer_hash: str  # megalm.data.tokenizer.tokenizer_hash: sources mixed or resumed must share it
    vocab_size: int  # the tokenizer's
    eot_id: int  # end-of-text token, appended to every document when packing
    dtype: str  # numpy dtype of the stored token ids
    documents: int
    skipped: list[str]  # source files left out, each with the reason
    train: list[ShardEntry]
    val: list[ShardEntry]
    train_tokens: int
    val_tokens: int
    unigram_entropy_nats: float  # of the training tokens: the loss of a model that ignores context
    prepare_seconds: float
    cleaning: CleaningCounts = field(default_factory=CleaningCounts)
    version: int = VERSION


@dataclass(frozen=True)
class ScanResult:
    """What prepare's first pass over the source found; fixed for the rest of the preparation."""

    source: str  # a description of where the text came from
    cleaning: CleaningCounts
    skipped: list[str]  # documents left out as not UTF-8, by name (the first 100, then how many more)
    text_bytes: int  # UTF-8 bytes of the kept documents' cleaned text: the second pass's total


@dataclass(frozen=True)
class DoneShard:
    split: str  # train or val
    entry: ShardEntry
    end: int  # source document index after the shard's last document: where its split goes on
    text_bytes: int  # UTF-8 bytes of its documents' cleaned text


@dataclass(frozen=True)
class PrepareProgress(Record):
    FILE: ClassVar[str] = "progress.json"
    VERSION: ClassVar[int] = 1
    ERROR: ClassVar[type[Exception]] = DataError

    settings: PrepareSettings
    source_fingerprint: str  # megalm.data.sources.Source.fingerprint of the input
    tokenizer_hash: str  # of tokenizer.json in the same directory
    scan: ScanResult
    version: int = VERSION


DONE_SHARDS = "shards.jsonl"


def append_done_shard(directory: Path, shard: DoneShard) -> None:
    """Add a closed shard to the list, durably."""
    with open(directory / DONE_SHARDS, "a") as f:
        f.write(json.dumps(asdict(shard)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_done_shards(directory: Path) -> list[DoneShard]:
    """The closed shards in the order they closed; a line cut short by a crash ends the list."""
    path = directory / DONE_SHARDS
    shards: list[DoneShard] = []
    if path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith("\n") else None
                shards.append(DoneShard(row["split"], ShardEntry(**row["entry"]), row["end"], row["text_bytes"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    return shards


def write_done_shards(directory: Path, shards: list[DoneShard]) -> None:
    atomic_write_text(directory / DONE_SHARDS, "".join(json.dumps(asdict(s)) + "\n" for s in shards))

"""The manifest of a prepared data directory, ``index.json``: how the data was made and what is in it.

``megalm prepare`` writes it last (the directory is valid only once it exists); training reads it
to find the shards, the tokenizer and the vocabulary. This is the one place that knows its fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from megalm.config import DataConfig
from megalm.data.sources import DataError
from megalm.records import Record


@dataclass(frozen=True)
class PrepareSettings:
    """The ``data.*`` keys that determine a prepared directory's contents."""

    source: str
    tokenizer: str
    vocab_size: int
    val_fraction: float
    shard_tokens: int
    streams: int
    seed: int

    @classmethod
    def of(cls, cfg: DataConfig) -> "PrepareSettings":
        return cls(source=cfg.source, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                   val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens, streams=cfg.streams,
                   seed=cfg.seed)

    def differences(self, other: "PrepareSettings") -> dict[str, tuple]:
        """``data.KEY -> (ours, theirs)`` for the keys that change the contents. ``streams`` only
        sets a minimum number of shards: a directory with enough shards serves any."""
        ours, theirs = asdict(self), asdict(other)
        return {f"data.{k}": (v, theirs[k]) for k, v in ours.items() if k != "streams" and theirs[k] != v}


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name inside the data directory
    samples: int  # documents
    tokens: int  # tokens of those documents (end-of-text separators not counted)


@dataclass(frozen=True)
class DataManifest(Record):
    FILE: ClassVar[str] = "index.json"
    VERSION: ClassVar[int] = 2
    ERROR: ClassVar[type[Exception]] = DataError
    REMEDY: ClassVar[str] = "re-run `megalm prepare --force` for this data.dir"

    settings: PrepareSettings
    source: str  # a description of where the text came from
    tokenizer: str  # file name of the HF tokenizers JSON inside the data directory
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
    version: int = VERSION

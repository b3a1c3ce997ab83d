"""``megalm prepare``: text -> tokenizer.json + webdataset tar shards + index.json.

Documents are split into train and validation by a seeded hash of their name, so the split does
not depend on file order. Training documents are dealt round-robin to one shard writer per data
stream (``data.streams``), which guarantees every stream gets shards; a writer starts a new shard
when the current one reaches ``data.shard_tokens``. Each tar sample is one document, stored as
``tokens.npy``. Everything is written into a temporary directory that is renamed into place only
when complete, so an interrupted prepare never leaves a directory that looks valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from megalm.config import DataConfig
from megalm.data.manifest import DataManifest, PrepareSettings, ShardEntry
from megalm.data.sources import DataError, open_source
from megalm.data.tokenizer import eot_id, load_tokenizer, train_tokenizer

log = logging.getLogger("megalm.data")

ENCODE_BATCH = 256


def read_manifest(data_dir: str | Path) -> DataManifest:
    """The manifest of a prepared directory; a missing one says to run ``megalm prepare``."""
    if not (Path(data_dir) / DataManifest.FILE).is_file():
        raise DataError(f"{Path(data_dir) / DataManifest.FILE}: not found; run `megalm prepare` for this data.dir first")
    return DataManifest.read(data_dir)


def prepare(cfg: DataConfig, force: bool = False) -> DataManifest:
    """Prepare ``cfg.dir`` from ``cfg.source`` unless it already holds the same preparation."""
    out = Path(cfg.dir)
    settings = PrepareSettings.of(cfg)
    if (out / DataManifest.FILE).is_file() and not force:
        manifest = read_manifest(out)
        differ = settings.differences(manifest.settings)
        if not differ:
            log.info("data: %s already prepared (%d train shards, %d tokens); reusing it",
                     out, len(manifest.train), manifest.train_tokens)
            return manifest
        raise DataError(
            f"{out}: already holds data prepared with other settings "
            f"({', '.join(f'{k}={new!r} here, {old!r} there' for k, (new, old) in differ.items())}); "
            f"choose another data.dir, or run `megalm prepare --force` to replace it")
    if out.exists() and not (out / DataManifest.FILE).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a prepared data directory; choose another data.dir")

    t0 = time.time()
    source = open_source(cfg.source)
    log.info("data: reading %s (%d files)", source.description, len(source.files))
    names: list[str] = []

    def texts():  # one pass lists the documents and, unless a tokenizer is given, trains one
        for name, text in source.documents():
            names.append(name)
            yield text

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        for _ in texts():
            pass
    else:
        tok = train_tokenizer(texts(), cfg.vocab_size)
    skipped = list(source.skipped)
    if not names:
        raise DataError(f"data.source: {source.description} has no non-empty UTF-8 text files "
                        f"({len(source.skipped)} skipped)")
    if len(names) < 2:
        raise DataError(f"data.source: {source.description} has one document; need at least 2 "
                        f"(one for training, one for validation)")
    val_names = _validation_split(names, cfg.val_fraction, cfg.seed)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok.save(str(tmp / "tokenizer.json"))
        dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
        train = _ShardSet(tmp, "train", cfg.streams, cfg.shard_tokens, dtype)
        val = _ShardSet(tmp, "val", 1, cfg.shard_tokens, dtype)
        counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
        eot = eot_id(tok)
        batch: list[tuple[str, str]] = []
        for doc in source.documents():
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                _encode_into(tok, batch, val_names, train, val, counts, eot)
                batch = []
        _encode_into(tok, batch, val_names, train, val, counts, eot)
        val_shards = val.close()
        manifest = DataManifest(
            settings=settings, source=source.description, tokenizer="tokenizer.json",
            vocab_size=tok.get_vocab_size(), eot_id=eot, dtype=np.dtype(dtype).name, documents=len(names),
            skipped=skipped, train=train.close(), val=val_shards, train_tokens=int(counts.sum()),
            val_tokens=sum(s.tokens for s in val_shards), unigram_entropy_nats=_entropy(counts),
            prepare_seconds=round(time.time() - t0, 1))
        manifest.write(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("data: wrote %d train shards (%d tokens) and %d val shards (%d tokens) to %s in %.1fs; skipped %d files",
             len(manifest.train), manifest.train_tokens, len(manifest.val), manifest.val_tokens, out,
             manifest.prepare_seconds, len(skipped))
    return manifest


def _validation_split(names: list[str], fraction: float, seed: int) -> set[str]:
    def unit(name: str) -> float:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    val = {n for n in names if unit(n) < fraction}
    if not val:  # tiny corpora: hold out at least one document
        val = {min(names, key=unit)}
    if len(val) == len(names):
        val.discard(max(names, key=unit))
    return val


def _encode_into(tok, batch, val_names, train, val, counts, eot) -> None:
    if not batch:
        return
    encodings = tok.encode_batch([text for _, text in batch])
    for (name, _), enc in zip(batch, encodings):
        tokens = np.asarray(enc.ids, dtype=np.int64)
        if name in val_names:
            val.add(tokens)
        else:
            train.add(tokens)
            counts += np.bincount(tokens, minlength=len(counts))
            counts[eot] += 1  # each document is followed by end-of-text when packed


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class _Writer:
    tar: wds.TarWriter
    name: str
    samples: int = 0
    tokens: int = 0


class _ShardSet:
    """``lanes`` shard writers fed round-robin; a lane rolls to a new shard past ``shard_tokens``."""

    def __init__(self, root: Path, prefix: str, lanes: int, shard_tokens: int, dtype):
        self.root, self.prefix, self.shard_tokens, self.dtype = root, prefix, shard_tokens, dtype
        self.lanes: list[_Writer | None] = [None] * lanes
        self.done: list[ShardEntry] = []
        self.next_shard = 0
        self.next_doc = 0

    def add(self, tokens: np.ndarray) -> None:
        lane = self.next_doc % len(self.lanes)
        writer = self.lanes[lane]
        if writer is None or writer.tokens >= self.shard_tokens:
            self._finish(writer)
            name = f"{self.prefix}-{self.next_shard:06d}.tar"
            self.next_shard += 1
            writer = self.lanes[lane] = _Writer(wds.TarWriter(str(self.root / name)), name)
        writer.tar.write({"__key__": f"{self.next_doc:09d}", "tokens.npy": tokens.astype(self.dtype)})
        writer.samples += 1
        writer.tokens += len(tokens)
        self.next_doc += 1

    def _finish(self, writer: _Writer | None) -> None:
        if writer is not None:
            writer.tar.close()
            self.done.append(ShardEntry(writer.name, writer.samples, writer.tokens))

    def close(self) -> list[ShardEntry]:
        for writer in self.lanes:
            self._finish(writer)
        self.lanes = [None] * len(self.lanes)
        return sorted(self.done, key=lambda s: s.name)

"""``megalm prepare``: source text -> tokenizer.json + webdataset tar shards + index.json.

Two passes over the source (megalm.data.sources), each spread over worker processes
(megalm.data.workers) that return their results in source order:

1. scan: every document is cleaned (megalm.data.clean) and kept, or counted as dropped (not UTF-8,
   empty, too short, an exact duplicate of an earlier one). A kept document goes to validation by a
   seeded hash of its name, so the split does not depend on file order, else to training. Without a
   ``data.tokenizer`` the tokenizer is trained on the kept documents in the same pass.
2. write: the kept documents are cleaned again, tokenized, and written in source order into the
   shards of their split, one tar sample (``tokens.npy``) per document; a shard is closed once it
   holds ``data.shard_tokens`` tokens.

The parent alone decides and writes, in source order, so the output is the same byte for byte for
any number of workers. Everything goes into ``.NAME.tmp`` beside ``data.dir``, renamed into place
only when complete. Besides the shards it holds the tokenizer, the scan's outcome per document
(``plan.npy``), its counts (``progress.json``) and the closed shards (``shards.jsonl``): a prepare
that was interrupted, run again with the same settings and input, skips the scan, checks the closed
shards' checksums and writes only the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import resource
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer

from megalm.common import checksum
from megalm.config import DataConfig
from megalm.data import workers
from megalm.data.clean import NOT_UTF8, OK, Cleaner
from megalm.data.location import Location
from megalm.data.manifest import (DONE_SHARDS, CleaningCounts, DataManifest, DoneShard, PrepareProgress,
                                  PrepareSettings, ScanResult, ShardEntry, append_done_shard, read_done_shards,
                                  write_done_shards)
from megalm.data.sources import Source, open_source
from megalm.data.tokenizer import eot_id, load_tokenizer, token_dtype, tokenizer_hash, train_tokenizer
from megalm.errors import DataError
from megalm.records import fsync_dir

log = logging.getLogger("megalm.data")

DROPPED, TRAIN, VAL = 0, 1, 2  # a document's outcome in plan.npy
SPLITS = {TRAIN: "train", VAL: "val"}
PLAN = "plan.npy"
TOKENIZER = "tokenizer.json"
SKIPPED_NAMES = 100  # documents named in index.json's `skipped`; the rest are only counted


def read_manifest(data_dir: str | Path) -> DataManifest:
    """The manifest of a prepared directory; a missing one says to run ``megalm prepare``."""
    if not (Path(data_dir) / DataManifest.FILE).is_file():
        raise DataError(f"{Path(data_dir) / DataManifest.FILE}: not found; run `megalm prepare` for this data.dir first")
    return DataManifest.read(data_dir)


def ensure_prepared(cfg: DataConfig) -> DataManifest:
    """The manifest of ``data.dir`` for training, which needs nothing else: a directory holding an
    index.json is used as it was prepared (its manifest says how, so this config's prepare-time keys
    are not compared). Only a local data.dir without one is prepared here, from ``data.source``."""
    location = Location(cfg.dir, cfg.shards, cfg.cache_dir)
    if location.is_local and not (Path(cfg.dir) / DataManifest.FILE).is_file():
        return prepare(cfg)
    manifest = location.manifest()
    log.info("data: %s was prepared from %s: vocab %d, tokenizer %s, %d train shards (%d tokens)", cfg.dir,
             manifest.source, manifest.vocab_size, manifest.tokenizer_hash[:12], len(manifest.train),
             manifest.train_tokens)
    return manifest


def prepare(cfg: DataConfig, force: bool = False) -> DataManifest:
    """Prepare ``cfg.dir`` from ``cfg.source`` unless it already holds the same preparation. A remote
    ``data.dir`` (http, pipe:) is only read: prepare into a local directory and upload that."""
    if not Location(cfg.dir, cfg.shards, cfg.cache_dir).is_local:
        if force:
            raise DataError(f"data.dir {cfg.dir}: remote, so it cannot be prepared in place; prepare into a local "
                            f"directory (data.dir=PATH) and copy it there")
        return ensure_prepared(cfg)
    out = Path(cfg.dir)
    settings = PrepareSettings.of(cfg)
    if (out / DataManifest.FILE).is_file() and not force:
        manifest = read_manifest(out)
        differ = settings.differences(manifest.settings)
        if not differ:
            log.info("data: %s already prepared (%d train shards, %d tokens); reusing it",
                     out, len(manifest.train), manifest.train_tokens)
            return manifest
        raise DataError(f"{out}: already holds data prepared with other settings ({_describe(differ)}); "
                        f"choose another data.dir, or run `megalm prepare --force` to replace it")
    if out.exists() and not (out / DataManifest.FILE).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a prepared data directory; choose another data.dir")

    t0 = time.time()
    source = open_source(cfg.source, cfg.text_field)
    tmp = out.with_name(f".{out.name}.tmp")  # the same name every time, so that a rerun finds it
    count = cfg.prepare_workers or _usable_cpus()
    try:
        with workers.Workers(count, Cleaner(cfg.normalize, cfg.min_chars)) as pool:
            progress, plan, done = _resume(tmp, settings, source, cfg) or _scan(tmp, settings, source, cfg, pool)
            tok = load_tokenizer(tmp / TOKENIZER)
            done, counts = _write_shards(tmp, progress, plan, done, source, cfg, pool, tok)
    except BaseException:
        if (tmp / PrepareProgress.FILE).is_file():
            log.info("data: stopped; %s keeps the work done so far: the same prepare run again finishes it", tmp)
        else:  # stopped in the scan, which leaves nothing a rerun could use
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = _manifest(progress, done, tok, counts, round(time.time() - t0, 1))
    for name in (PrepareProgress.FILE, PLAN, DONE_SHARDS):
        (tmp / name).unlink(missing_ok=True)
    with _writing(tmp / DataManifest.FILE):
        manifest.write(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    fsync_dir(out.parent)
    log.info("data: wrote %d train shards (%d tokens) and %d val shards (%d tokens) to %s in %.1fs",
             len(manifest.train), manifest.train_tokens, len(manifest.val), manifest.val_tokens, out,
             manifest.prepare_seconds)
    return manifest


def _usable_cpus() -> int:
    """The CPUs this process may run on: Slurm and containers allow fewer than os.cpu_count() sees."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _describe(differ: dict[str, tuple]) -> str:
    return ", ".join(f"{key}={new!r} here, {old!r} there" for key, (new, old) in differ.items())


@contextlib.contextmanager
def _writing(path: Path, abandon: Callable[[], None] | None = None) -> Iterator[None]:
    """A write of ``path`` that fails (the disk is full, a file-size limit) is a DataError naming the
    file and the space left, instead of an OSError that names neither; ``abandon`` lets go of what
    was open. What was done before stays in the temporary directory (see ``prepare``) for the rerun."""
    try:
        yield
    except OSError as e:
        if abandon is not None:
            abandon()
        raise DataError(f"{path}: cannot write: {e.strerror or e}; {_space(path, e)}; make room and run the same "
                        f"command again") from None


def _space(path: Path, e: OSError) -> str:
    """The free space on ``path``'s file system, and the file-size limit when that is what was hit."""
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.is_dir())).free
    text = f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"
    text += " free on its file system"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if e.errno == errno.EFBIG and limit != resource.RLIM_INFINITY:
        text += f", and files are limited to {limit:,} bytes (ulimit -f)"
    return text


# ------------------------------------------------------------------------------------ pass 1: scan

def _scan(tmp: Path, settings: PrepareSettings, source: Source, cfg: DataConfig,
          pool: workers.Workers) -> tuple[PrepareProgress, np.ndarray, list[DoneShard]]:
    """Decide on every document, train the tokenizer on the kept ones unless one is given, and save
    both (plan.npy, tokenizer.json) with progress.json into a fresh ``tmp``."""
    t0 = time.time()
    tmp.mkdir(parents=True)
    log.info("data: scanning %s (%d files, %.1f MB) with %s%s", source.description, len(source.files),
             source.total_bytes / 1e6, pool, "" if cfg.tokenizer else "; training a tokenizer on it")
    scanner = _Scanner(cfg)
    texts = scanner.run(source, pool, keep_text=not cfg.tokenizer)
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        for _ in texts:
            pass
    else:
        tok = train_tokenizer(texts, cfg.vocab_size)
    plan, scan = scanner.finish(source)
    with _writing(tmp / TOKENIZER):
        (tmp / TOKENIZER).write_text(tok.to_str(pretty=True))  # as tok.save writes it, but failing as an OSError
    with _writing(tmp / PLAN):
        np.save(tmp / PLAN, plan)
    c = scan.cleaning
    log.info("data: kept %d of %d documents (dropped %d not UTF-8, %d empty, %d shorter than %d characters, "
             "%d duplicates; normalized %d, removed %d control characters) in %.1fs", c.documents_out,
             c.documents_in, c.not_utf8, c.empty, c.too_short, cfg.min_chars, c.duplicates, c.normalized,
             c.control_chars_removed, time.time() - t0)
    progress = PrepareProgress(settings=settings, source_fingerprint=source.fingerprint(),
                               tokenizer_hash=tokenizer_hash(tmp / TOKENIZER), scan=scan)
    with _writing(tmp / PrepareProgress.FILE):
        progress.write(tmp)
    return progress, plan, []


class _Scanner:
    """The first pass's decisions, made in source order: drop, or keep for training or validation."""

    def __init__(self, cfg: DataConfig):
        self.dedup, self.val_fraction, self.seed = cfg.dedup, cfg.val_fraction, cfg.seed
        self.counts = CleaningCounts()
        self.seen: set[bytes] = set()
        self.plan = bytearray()
        self.skipped: list[str] = []
        self.text_bytes = 0
        self.val = 0
        # (unit, index) of the kept documents nearest to validation and to training: tiny corpora
        # still get one validation document and keep one for training
        self.lowest, self.highest = (1.0, -1), (0.0, -1)

    def run(self, source: Source, pool: workers.Workers, keep_text: bool):
        """Scan ``source``, yielding the cleaned text of each kept document when ``keep_text``."""
        bar = _Progress("scan", source.total_bytes)
        for names, results in pool.map(workers.scan, workers.chunked(source.documents()), keep_text):
            for name, result in zip(names, results):
                if self._decide(name, result) and keep_text:
                    yield result.text
            bar.update(source.bytes_done, self.counts.documents_in)
        bar.close()

    def _decide(self, name: str, r: workers.Scanned) -> int:
        c = self.counts
        c.documents_in += 1
        code = DROPPED
        if r.status != OK:
            setattr(c, r.status, getattr(c, r.status) + 1)  # the statuses are named as the counts
            if r.status == NOT_UTF8 and len(self.skipped) < SKIPPED_NAMES:
                self.skipped.append(f"{name} (not UTF-8)")
        elif self.dedup and r.digest in self.seen:
            c.duplicates += 1
        else:
            if self.dedup:
                self.seen.add(r.digest)
            c.documents_out += 1
            c.normalized += r.normalized
            c.control_chars_removed += r.control_removed
            self.text_bytes += r.text_bytes
            unit = _unit(self.seed, name)
            code = VAL if unit < self.val_fraction else TRAIN
            self.val += code == VAL
            self.lowest = min(self.lowest, (unit, len(self.plan)))
            self.highest = max(self.highest, (unit, len(self.plan)))
        self.plan.append(code)
        return code

    def finish(self, source: Source) -> tuple[np.ndarray, ScanResult]:
        c = self.counts
        if c.documents_out < 2:
            raise DataError(
                f"data.source: {source.description} has {c.documents_out} documents left after cleaning, need at "
                f"least 2 (one for training, one for validation); of {c.documents_in} read, {c.not_utf8} are not "
                f"UTF-8, {c.empty} empty, {c.too_short} shorter than data.min_chars, {c.duplicates} duplicates")
        plan = np.frombuffer(bytes(self.plan), np.uint8).copy()
        if self.val == 0:
            plan[self.lowest[1]] = VAL
        elif self.val == c.documents_out:
            plan[self.highest[1]] = TRAIN
        skipped = self.skipped + ([f"... and {c.not_utf8 - SKIPPED_NAMES} more not UTF-8"]
                                  if c.not_utf8 > SKIPPED_NAMES else [])
        return plan, ScanResult(source=source.description, cleaning=c, skipped=skipped, text_bytes=self.text_bytes)


def _unit(seed: int, name: str) -> float:
    """A document's place in [0, 1) by a seeded hash of its name: below val_fraction is validation."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# ------------------------------------------------------------------------------- resuming

def _resume(tmp: Path, settings: PrepareSettings, source: Source,
            cfg: DataConfig) -> tuple[PrepareProgress, np.ndarray, list[DoneShard]] | None:
    """What an unfinished preparation in ``tmp`` has done, if it is this same preparation; else None,
    and ``tmp`` is discarded."""
    if not tmp.exists():
        return None
    try:
        progress = PrepareProgress.read(tmp)
        plan = np.load(tmp / PLAN)
        ours = tokenizer_hash(tmp / TOKENIZER)
    except (DataError, OSError, ValueError) as e:
        why = f"it stopped before its scan was complete ({e})"
    else:
        differ = settings.differences(progress.settings)
        if differ:
            why = f"it was begun with other settings ({_describe(differ)})"
        elif progress.source_fingerprint != source.fingerprint() or len(plan) != progress.scan.cleaning.documents_in:
            why = f"the files of {source.description} changed since it began"
        elif progress.tokenizer_hash != ours or (cfg.tokenizer and tokenizer_hash(cfg.tokenizer) != ours):
            why = "its tokenizer is not the one it began with"
        else:
            why = ""
    if why:
        log.info("data: starting over: discarding the unfinished preparation in %s: %s", tmp, why)
        shutil.rmtree(tmp)
        return None
    done = _verified(tmp, read_done_shards(tmp))
    with _writing(tmp / DONE_SHARDS):
        write_done_shards(tmp, done)  # without the shards to write again, and a line a crash cut short
    log.info("data: resuming the preparation in %s: %d of its shards are written", tmp, len(done))
    return progress, plan, done


def _verified(tmp: Path, shards: list[DoneShard]) -> list[DoneShard]:
    """The closed shards whose files still match their entries; after a bad one, its split is redone."""
    good, redo = [], set()
    for shard in shards:
        if shard.split in redo:
            continue
        path = tmp / shard.entry.name
        problem = _shard_problem(path, shard.entry)
        if problem:
            log.info("data: %s: %s; writing it and the %s shards after it again", path, problem, shard.split)
            redo.add(shard.split)
        else:
            good.append(shard)
    return good


def _shard_problem(path: Path, entry: ShardEntry) -> str:
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry.bytes:
        return f"holds {path.stat().st_size} bytes, not {entry.bytes}"
    return "checksum differs" if checksum(path) != entry.xxh3 else ""


# ------------------------------------------------------------------------------- pass 2: write

def _write_shards(tmp: Path, progress: PrepareProgress, plan: np.ndarray, done: list[DoneShard], source: Source,
                  cfg: DataConfig, pool: workers.Workers, tok: Tokenizer) -> tuple[list[DoneShard], np.ndarray]:
    """Tokenize the kept documents that are not in a closed shard (``done``) and write them; returns
    all the shards and the unigram counts of the training tokens."""
    t0 = time.time()
    dtype = token_dtype(tok.get_vocab_size())
    shards = _Shards(tmp, done, cfg.shard_tokens, tok.get_vocab_size(), eot_id(tok))
    start = {code: split.resume_at for code, split in shards.splits.items()}

    def todo():
        for index, (_, body) in enumerate(source.documents()):
            if index >= len(plan):
                raise DataError(f"data.source: {source.description} changed while being prepared (more documents "
                                f"than its scan found); run `megalm prepare` again")
            code = int(plan[index])
            if code != DROPPED and index >= start[code]:
                yield (index, code), body

    done_bytes = sum(s.text_bytes for s in done)
    bar = _Progress("tokenize", progress.scan.text_bytes, done_bytes)
    docs = tokens = 0
    for keys, (ids, lengths, sizes) in pool.map(workers.encode, workers.chunked(todo()), str(tmp / TOKENIZER),
                                                dtype.str):
        ends = np.cumsum(lengths).tolist()
        for (index, code), end, length, size in zip(keys, ends, lengths.tolist(), sizes):
            shards.add(index, code, ids[end - length:end], size)
        docs, tokens, done_bytes = docs + len(keys), tokens + len(ids), done_bytes + sum(sizes)
        bar.update(done_bytes, docs, tokens)
    bar.close()
    shards.finish(len(plan))
    seconds = time.time() - t0
    log.info("data: tokenized and wrote %d documents, %d tokens in %.1fs (%.0f tokens/s with %s)", docs, tokens,
             seconds, tokens / max(seconds, 1e-9), pool)
    return shards.done, shards.counts


class _Split:
    """The shards of one split, filled in source order; one is open at a time."""

    def __init__(self, root: Path, name: str, done: list[DoneShard]):
        self.root, self.name = root, name
        self.next_shard = len(done)
        self.next_key = sum(s.entry.samples for s in done)  # sample keys number the split's documents
        self.resume_at = done[-1].end if done else 0  # the source document after its last closed shard
        self.file = self.tar = None
        self.docs: list[np.ndarray] = []
        self.tokens = self.text_bytes = 0

    @property
    def shard_name(self) -> str:
        return f"{self.name}-{self.next_shard:06d}.tar"

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        with _writing(self.root / self.shard_name, self._abandon):
            if self.tar is None:
                self.file = open(self.root / self.shard_name, "wb")
                self.tar = wds.TarWriter(self.file, mtime=0)  # a fixed time: the same input gives the same bytes
            self.tar.write({"__key__": f"{self.next_key:09d}", "tokens.npy": tokens})
        self.next_key += 1
        self.docs.append(tokens)
        self.tokens += len(tokens)
        self.text_bytes += text_bytes

    def close(self, end: int) -> tuple[DoneShard, list[np.ndarray]]:
        """Close the open shard, whose last document is the one before ``end`` in the source; returns
        its record and its documents."""
        path = self.root / self.shard_name
        with _writing(path, self._abandon):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        entry = ShardEntry(self.shard_name, len(self.docs), self.tokens, path.stat().st_size, checksum(path))
        closed = DoneShard(self.name, entry, end, self.text_bytes), self.docs
        self.next_shard += 1
        self.file = self.tar = None
        self.docs, self.tokens, self.text_bytes = [], 0, 0
        return closed

    def _abandon(self) -> None:
        """After a failed write: close the open shard without writing more (a rerun writes it again
        from its first document), so that the tar stream does not retry the write when collected."""
        for close in (self.tar.close, self.file.close) if self.tar is not None else ():
            with contextlib.suppress(OSError, ValueError):
                close()
        self.file = self.tar = None


class _Shards:
    """Both splits' shards, each closed once it holds ``shard_tokens`` and then added to shards.jsonl;
    and the unigram counts of the training tokens."""

    def __init__(self, tmp: Path, done: list[DoneShard], shard_tokens: int, vocab_size: int, eot: int):
        self.tmp, self.done, self.shard_tokens, self.eot = tmp, list(done), shard_tokens, eot
        self.splits = {code: _Split(tmp, name, [s for s in done if s.split == name]) for code, name in SPLITS.items()}
        self.counts = np.zeros(vocab_size, np.int64)
        for shard in done:  # closed by an earlier run: their tokens are counted from the files
            if shard.split == SPLITS[TRAIN]:
                self._count(_read_documents(tmp / shard.entry.name))

    def add(self, index: int, code: int, tokens: np.ndarray, text_bytes: int) -> None:
        split = self.splits[code]
        split.add(tokens, text_bytes)
        if split.tokens >= self.shard_tokens:
            self._record(*split.close(index + 1))

    def finish(self, end: int) -> None:
        for split in self.splits.values():
            if split.tar is not None:
                self._record(*split.close(end))

    def _record(self, shard: DoneShard, docs: list[np.ndarray]) -> None:
        if shard.split == SPLITS[TRAIN]:
            self._count(docs)
        self.done.append(shard)
        with _writing(self.tmp / DONE_SHARDS):
            append_done_shard(self.tmp, shard)

    def _count(self, docs: list[np.ndarray]) -> None:
        self.counts += np.bincount(np.concatenate(docs), minlength=len(self.counts))
        self.counts[self.eot] += len(docs)  # each document is followed by end-of-text when packed


def _read_documents(path: Path) -> list[np.ndarray]:
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".tokens.npy")]


def _manifest(progress: PrepareProgress, done: list[DoneShard], tok: Tokenizer, counts: np.ndarray,
              seconds: float) -> DataManifest:
    train = [s.entry for s in done if s.split == SPLITS[TRAIN]]
    val = [s.entry for s in done if s.split == SPLITS[VAL]]
    p = counts[counts > 0] / counts.sum()
    return DataManifest(
        settings=progress.settings, source=progress.scan.source, tokenizer=TOKENIZER,
        tokenizer_hash=progress.tokenizer_hash, vocab_size=tok.get_vocab_size(), eot_id=eot_id(tok),
        dtype=token_dtype(tok.get_vocab_size()).name, documents=progress.scan.cleaning.documents_out,
        skipped=progress.scan.skipped, train=train, val=val, train_tokens=int(counts.sum()),
        val_tokens=sum(e.tokens for e in val), unigram_entropy_nats=float(-(p * np.log(p)).sum()),
        prepare_seconds=seconds, cleaning=progress.scan.cleaning)


# ------------------------------------------------------------------------------- progress display

class _Progress:
    """A pass's progress on stderr: one line redrawn in place on a terminal, else a log line every
    LOG_EVERY_S seconds (Slurm logs, pipes). Rates count only this run's work."""

    LOG_EVERY_S = 30.0

    def __init__(self, what: str, total_bytes: int, done_bytes: int = 0):
        self.what, self.total, self.start = what, total_bytes, done_bytes
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.drawn = False

    def update(self, done_bytes: int, docs: int, tokens: int | None = None) -> None:
        now = time.monotonic()
        if now - self.last < (0.5 if self.tty else self.LOG_EVERY_S):
            return
        self.last = now
        rate = (done_bytes - self.start) / (now - self.t0)
        line = f"{self.what} {100 * done_bytes / max(self.total, 1):.0f}%  {docs:,} documents"
        if tokens is not None:
            line += f"  {tokens:,} tokens ({tokens / (now - self.t0):,.0f}/s)"
        line += f"  {rate / 1e6:.1f} MB/s"
        if rate > 0:
            line += f"  eta {_duration((self.total - done_bytes) / rate)}"
        if self.tty:
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
            self.drawn = True
        else:
            log.info("data: %s", line)

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

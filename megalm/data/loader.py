"""Streaming training batches from webdataset shards: each rank reads its lanes of the global batch.

``megalm.data.dataset`` fixes which sequence every lane yields at every step. Here a :class:`Lane`
reads them: it opens the shards of its block of the epoch in order (checked against their size and
checksum first), shuffles their documents through a bounded buffer and cuts the token stream into
sequences. Data-parallel rank r takes the rows ``BatchLayout.rows(r)`` of the global batch; its
loader workers split those lanes. The loader's state is the number of steps it handed out, so a
checkpoint resumes on any number of ranks or workers with no sequence seen twice or skipped.

A shard that cannot be used (missing, unreachable, truncated, corrupt) stops training with its name
(``data.on_bad_shard=error``), or with ``skip`` becomes a hole: its tokens' place in the epoch stays
where it was, filled with positions that carry no loss, so every other sequence keeps its place and
exactly-once holds for the rest. Memory per worker: its lanes' shuffle buffers (``data.shuffle_tokens``
each) plus the document being cut; remote shards are spooled to local disk, not memory.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megalm.common import IGNORE
from megalm.config import BatchLayout
from megalm.data.dataset import TrainSource, apportion
from megalm.data.location import BadShard
from megalm.data.manifest import ShardEntry
from megalm.errors import DataError

log = logging.getLogger("megalm.data")

CHUNK_TOKENS = 1 << 18  # loader workers hand over about this many tokens at a time...
MAX_CHUNK_STEPS = 64  # ...but read at most this many steps ahead


def shard_documents(path: Path, shard: ShardEntry, url: str) -> Iterator[np.ndarray]:
    """The documents of a checked local shard file, in file order."""
    # Ranks and workers already decide who reads which shard: webdataset's splitting is off.
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None)
    count = 0
    try:
        for sample in dataset:
            count += 1
            yield np.load(io.BytesIO(sample["tokens.npy"]))
    except Exception as e:  # tarfile, numpy and webdataset raise assorted types
        raise DataError(f"shard {url}: unreadable ({type(e).__name__}: {e}); re-run `megalm prepare`") from None
    if count != shard.samples:
        raise DataError(f"shard {url}: holds {count} documents, index.json says {shard.samples}; re-run "
                        f"`megalm prepare`")


def bounded_shuffle(docs: Iterator[np.ndarray], rng: np.random.Generator, buffer_tokens: int) -> Iterator[np.ndarray]:
    """Documents in a seeded random order drawn from a buffer of at most ~``buffer_tokens`` tokens."""
    buf: list[np.ndarray] = []
    held = 0
    for doc in docs:
        buf.append(doc)
        held += len(doc)
        while held >= buffer_tokens:
            doc = _pop_random(buf, rng)
            held -= len(doc)
            yield doc
    while buf:
        yield _pop_random(buf, rng)


def _pop_random(buf: list, rng: np.random.Generator):
    i = int(rng.integers(len(buf)))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


@dataclass
class Piece:
    """A run of the epoch's token stream: real tokens, or a hole (a skipped shard) of ``length``."""

    tokens: np.ndarray | None
    length: int


class Lane:
    """One lane of one source: its sequence at each step, read sequentially, seekable anywhere."""

    def __init__(self, source: TrainSource, lane: int, on_bad_shard: str, spool_dir: Path):
        self.source, self.lane, self.on_bad_shard = source, lane, on_bad_shard
        self.spool = spool_dir / f"lane-{source.index}-{lane}.tar"
        self.need = source.seq_len + 1
        self.bad_shards: list[str] = []  # reported since the last take_reports()
        self._at: tuple[int, int] | None = None  # (epoch, token offset) of the next token to read
        self._pieces: Iterator[Piece] = iter(())
        self._current: Piece | None = None
        self._used = 0  # tokens of the current piece already taken

    def sequence(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens of this lane's sequence at ``step`` and their validity (None: all valid)."""
        epoch, t = divmod(step, self.source.steps_per_epoch)
        start = (self.lane * self.source.steps_per_epoch + t) * self.need
        if self._at != (epoch, start):
            self._seek(epoch, start)
        tokens, valid = np.empty(self.need, np.int64), None
        filled = 0
        while filled < self.need:
            if self._current is None or self._used == self._current.length:
                self._current, self._used = next(self._pieces), 0
            take = min(self.need - filled, self._current.length - self._used)
            if self._current.tokens is None:
                if valid is None:
                    valid = np.ones(self.need, bool)
                tokens[filled:filled + take] = self.source.manifest.eot_id
                valid[filled:filled + take] = False
            else:
                tokens[filled:filled + take] = self._current.tokens[self._used:self._used + take]
            filled += take
            self._used += take
        self._at = (epoch, start + self.need)
        return tokens, valid

    def _seek(self, epoch: int, offset: int) -> None:
        order, starts = self.source.epoch_offsets(epoch)
        slot = int(np.searchsorted(starts, offset, side="right")) - 1
        self._pieces = self._stream(epoch, order, starts, slot, report_first=offset == starts[slot])
        self._current, self._used = None, 0
        skip = offset - int(starts[slot])
        while skip:
            piece = next(self._pieces)
            if piece.length > skip:
                self._current, self._used = piece, skip
                break
            skip -= piece.length

    def _stream(self, epoch: int, order: np.ndarray, starts: np.ndarray, slot: int,
                report_first: bool) -> Iterator[Piece]:
        """The epoch's pieces from shard ``slot`` on. A hole is reported by the lane it starts in."""
        region = (self.lane * self.source.steps_per_epoch * self.need,
                  (self.lane + 1) * self.source.steps_per_epoch * self.need)
        eot = np.array([self.source.manifest.eot_id], np.int64)
        for slot in range(slot, len(order)):
            index = int(order[slot])
            shard = self.source.shard(index)
            url = self.source.location.url(shard.name)
            try:
                path = self.source.location.fetch_shard(shard, self.spool)
            except BadShard as bad:
                if self.on_bad_shard == "error":
                    raise DataError(f"{bad}; restore it, re-run `megalm prepare` for {self.source.location}, or set "
                                    f"data.on_bad_shard=skip to train without it") from None
                if report_first and region[0] <= starts[slot] < region[1]:
                    log.warning("data: skipping bad shard %s (%d tokens left as a hole)", bad, shard.tokens)
                    self.bad_shards.append(url)
                yield Piece(None, shard.tokens + shard.samples)
                report_first = True
                continue
            report_first = True
            docs = bounded_shuffle(shard_documents(path, shard, url), self.source.document_rng(epoch, index),
                                   self.source.shuffle_tokens)
            for doc in docs:
                yield Piece(np.concatenate([doc.astype(np.int64), eot]), len(doc) + 1)
            if path == self.spool:
                self.spool.unlink(missing_ok=True)
        raise AssertionError("a lane read past the end of its epoch")  # regions end inside the epoch

    def take_reports(self) -> list[str]:
        reports, self.bad_shards = self.bad_shards, []
        return reports


@dataclass
class _Chunk:
    """One worker's rows of ``len(tokens)`` consecutive steps. A plain class: the DataLoader passes
    it on untouched (its tensors travel between processes in shared memory)."""

    rows: list[int]
    tokens: torch.Tensor  # (steps, rows, seq_len + 1)
    valid: torch.Tensor | None  # the same shape, or None: every token is real
    bad_shards: list[list[str]]  # per step
    error: str = ""


class _LaneRows(IterableDataset):
    """For this worker's lanes, chunks of ``steps_per_chunk`` steps: handing batches between
    processes costs about a millisecond each, so small steps travel several at a time."""

    def __init__(self, lanes: list[tuple[int, TrainSource, int]], first_step: int, steps_per_chunk: int,
                 on_bad_shard: str, spool: Path):
        self.lanes, self.first_step, self.steps_per_chunk = lanes, first_step, steps_per_chunk
        self.on_bad_shard, self.spool = on_bad_shard, spool

    def __iter__(self):
        info = get_worker_info()
        mine = self.lanes if info is None else self.lanes[info.id::info.num_workers]
        spool = self.spool / f"worker-{os.getpid()}"
        readers = [(row, Lane(source, lane, self.on_bad_shard, spool)) for row, source, lane in mine]
        step = self.first_step
        while True:
            steps = range(step, step + self.steps_per_chunk)
            seqs, bad = [], []
            try:
                for s in steps:
                    seqs.append([reader.sequence(s) for _, reader in readers])
                    bad.append([u for _, reader in readers for u in reader.take_reports()])
            except DataError as e:  # passed to the main process as a value: its message stays clean
                yield _Chunk([], torch.empty(0), None, [], error=str(e))
                return
            valid = None
            if any(v is not None for per_step in seqs for _, v in per_step):
                valid = torch.from_numpy(np.array([[np.ones(len(t), bool) if v is None else v for t, v in per_step]
                                                   for per_step in seqs]))
            tokens = torch.from_numpy(np.array([[t for t, _ in per_step] for per_step in seqs]))
            yield _Chunk([row for row, _ in readers], tokens, valid, bad)
            step += self.steps_per_chunk


@dataclass
class Step:
    """One optimizer step's data on this rank."""

    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]  # (inputs, labels); padding labels are IGNORE
    sequences: torch.Tensor  # this rank's real rows of the global batch (their fingerprint names the data)
    loss_tokens: int  # labels that count, on this rank
    tokens: int  # input tokens of this rank's real rows (throughput counts them)
    tokens_by_source: list[int]  # labels that count, per source (in data.mix order)
    bad_shards: list[str]  # skipped shards first found by this rank's lanes in this step


class TrainLoader:
    """Per-rank iterator of :class:`Step`; its state is the number of steps handed out.

    ``load_state_dict`` must come before the first step (reading starts, in the loader workers, at
    the first ``next``).
    """

    def __init__(self, sources: list[TrainSource], layout: BatchLayout, dp_rank: int, objective, *,
                 num_workers: int, on_bad_shard: str = "error", spool_dir: str | Path = ""):
        self.sources, self.layout, self.on_bad_shard = sources, layout, on_bad_shard
        self.objective = objective  # megalm.train.objective: makes the inputs and labels
        self.rows = layout.rows(dp_rank)
        lane_of_row = [(s, lane) for s in sources for lane in range(s.lanes)]
        self._lanes = [(row, *lane_of_row[row]) for row in self.rows]
        self.num_workers = min(num_workers, len(self._lanes))
        if num_workers > self.num_workers:
            log.info("data: %d loader workers asked for, %d used (one lane each at most: this rank reads %d lanes)",
                     num_workers, self.num_workers, len(self._lanes))
        self.spool = Path(spool_dir or sources[0].location.cache) / "spool"
        self.step = 0
        self._chunks = None  # the DataLoader's iterator, started by the first step
        self._pending: list[tuple[_Chunk, int]] = []  # per worker: its current chunk, next step in it

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        if self._chunks is None:
            per_step = max(1, len(self._lanes) // max(1, self.num_workers)) * (self.sources[0].seq_len + 1)
            steps_per_chunk = min(-(-CHUNK_TOKENS // per_step), MAX_CHUNK_STEPS) if self.num_workers else 1
            dataset = _LaneRows(self._lanes, self.step, steps_per_chunk, self.on_bad_shard, self.spool)
            w = self.num_workers
            self._chunks = iter(DataLoader(dataset, batch_size=None, num_workers=w, persistent_workers=w > 0,
                                           prefetch_factor=4 if w else None))
        need = self.layout.micro_batch_size * self.layout.grad_accum
        seq = self.sources[0].seq_len + 1
        n = len(self._lanes)
        tokens = torch.full((need, seq), self.sources[0].manifest.eot_id, dtype=torch.int64)
        valid = torch.ones((need, seq), dtype=torch.bool)
        valid[n:] = False  # padding rows
        holes, bad = False, []
        for chunk, i in self._next_chunks() if n else []:
            local = [r - self.rows.start for r in chunk.rows]
            tokens[local] = chunk.tokens[i]
            if chunk.valid is not None:
                valid[local], holes = chunk.valid[i], True
            bad += chunk.bad_shards[i]
        rows = torch.arange(self.rows.start, self.rows.start + need)  # padding rows run past this rank's: no matter
        inputs, labels = self.objective.examples(tokens, valid if n < need or holes else None, self.step, rows)
        self.step += 1
        counted = (labels[:n] != IGNORE).sum(dim=1).tolist()
        by_source = [0] * len(self.sources)
        for (_, source, _), count in zip(self._lanes, counted):
            by_source[source.index] += count
        mb = self.layout.micro_batch_size
        return Step(list(zip(inputs.split(mb), labels.split(mb))), tokens[:n], loss_tokens=sum(by_source),
                    tokens=n * (seq - 1), tokens_by_source=by_source, bad_shards=bad)

    def _next_chunks(self) -> list[tuple[_Chunk, int]]:
        """Each worker's chunk holding this step, and the step's index in it. The DataLoader hands
        out the workers' chunks in turn, and every chunk spans as many steps, so taking a new one
        from each worker in order keeps them in step."""
        workers = max(1, self.num_workers)
        if not self._pending or self._pending[0][1] == len(self._pending[0][0].tokens):
            self._pending = [(next(self._chunks), 0) for _ in range(workers)]
            for chunk, _ in self._pending:
                if chunk.error:
                    raise DataError(chunk.error)
        out = self._pending
        self._pending = [(chunk, i + 1) for chunk, i in out]
        return out

    def state_dict(self) -> dict:
        """Where the data stands; the same on every rank (not collective)."""
        return {"step": self.step, **self._identity()}

    def _identity(self) -> dict:
        """What the data order depends on besides the step: a resume must keep it."""
        return {"global_batch": self.layout.global_batch, "seq_len": self.sources[0].seq_len,
                "sources": [{"dir": s.location.base, "lanes": s.lanes, "seed": s.seed,
                             "shards": len(s.manifest.train)} for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if self._chunks is not None:
            raise RuntimeError("TrainLoader.load_state_dict after the first step: reading already started")
        check_identity(self._identity(), state, "data", "the data order depends on it, so resume with the "
                       "checkpoint's train.global_batch, data.seq_len, data.seed and data sources")
        self.step = int(state["step"])


def check_identity(ours: dict, state: dict, what: str, fix: str) -> None:
    """A data position only means something for the data it was taken on: every key of ``ours``
    must be the checkpoint ``state``'s, or resuming would read other data than the run's."""
    for key, theirs in ((k, state.get(k)) for k in ours):
        if theirs != ours[key]:
            raise DataError(f"{what}: the checkpoint's data position is for {key}={theirs}, this run has "
                            f"{ours[key]}; {fix}")


VAL_TOKEN_CAP = 16_000_000  # validation sequences are drawn from at most this many tokens per source


def validation_sequences(sources: list[TrainSource], count: int, spool_dir: Path) -> torch.Tensor:
    """``count`` sequences spread evenly over the sources' validation splits, shared by weight.

    Spreading them matters: the first few documents alone are not a fair sample of the corpus.
    """
    shares = apportion([s.lanes for s in sources], count)
    return torch.cat([_validation_of(s, n, spool_dir) for s, n in zip(sources, shares) if n])


def _validation_of(source: TrainSource, count: int, spool_dir: Path) -> torch.Tensor:
    need = source.seq_len + 1
    pieces, have = [], 0
    eot = np.array([source.manifest.eot_id], dtype=np.int32)
    spool = spool_dir / f"val-{os.getpid()}.tar"
    for shard in source.manifest.val:
        path = source.location.fetch_shard(shard, spool)
        for doc in shard_documents(path, shard, source.location.url(shard.name)):
            pieces += [doc.astype(np.int32), eot]
            have += len(doc) + 1
        spool.unlink(missing_ok=True)
        if have >= VAL_TOKEN_CAP:
            break
    n = min(count, have // need)
    if n == 0:
        raise DataError(f"{source.location}: the validation split has {have} tokens, fewer than one sequence of "
                        f"{need}; raise data.val_fraction or lower data.seq_len")
    if n < count:
        log.warning("data: %s: validation split holds only %d sequences of %d tokens (asked for %d)",
                    source.location, n, need, count)
    tokens = np.concatenate(pieces)
    starts = np.linspace(0, len(tokens) - need, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + need] for s in starts]).astype(np.int64))

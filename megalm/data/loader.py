"""Streaming training batches from webdataset shards, with a state that resumes exactly.

The training shards are dealt to ``S = data.streams`` independent streams (shard i -> stream
i mod S). Each stream walks its shards in a seeded order per epoch, shuffles the documents of
each shard with a seeded permutation, joins documents with end-of-text and cuts the token stream
into sequences of ``seq_len + 1`` tokens. A stream's position is four integers
``(epoch, shard, doc, token)``: where its next sequence starts.

Every optimizer step takes the same number of sequences from every stream, ``global_batch / S``.
Data-parallel rank r owns streams r, r+dp, r+2dp, ... and its loader workers split those. So the
set of sequences in a step does not depend on the number of ranks or workers: one process and
N processes see the same global batch, and a checkpoint of all stream positions resumes on any
data-parallel size that divides S.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megalm.data.manifest import DataManifest, ShardEntry
from megalm.data.sources import DataError

log = logging.getLogger("megalm.data")


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream's next sequence starts."""

    epoch: int = 0
    shard: int = 0  # index into this epoch's shard order
    doc: int = 0  # index into the shard's shuffled documents
    token: int = 0  # offset into that document (its tokens followed by end-of-text)


def read_shard(path: Path, expected_samples: int) -> list[np.ndarray]:
    """All documents of one tar shard; a corrupt or short shard is an error naming it."""
    docs = []
    # The streams already decide which rank and worker reads which shard, so webdataset's own
    # node and worker splitting is switched off: it would hand this one shard to one worker only.
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    try:
        for sample in dataset:
            docs.append(np.load(io.BytesIO(sample["tokens.npy"])))
    except Exception as e:  # tarfile, numpy and webdataset raise assorted types
        raise DataError(f"shard {path}: unreadable ({type(e).__name__}: {e}); re-run `megalm prepare`") from None
    if len(docs) != expected_samples:
        raise DataError(f"shard {path}: holds {len(docs)} documents, index.json says {expected_samples}; "
                        f"the shard is truncated or was replaced; re-run `megalm prepare`")
    return docs


class Stream:
    """One stream's walk over its shards, yielding (sequence, position after it)."""

    def __init__(self, data_dir: Path, shards: list[ShardEntry], stream_id: int, seq_len: int, eot: int, seed: int):
        if not shards:
            raise DataError(f"{data_dir}: stream {stream_id} has no shards; prepare with more shards "
                            f"(smaller data.shard_tokens) or use fewer data.streams")
        self.data_dir, self.shards, self.id = data_dir, shards, stream_id
        self.seq_len, self.eot, self.seed = seq_len, eot, seed

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.id, epoch]).permutation(len(self.shards))

    def _documents(self, epoch: int, slot: int) -> list[np.ndarray]:
        shard_index = int(self._shard_order(epoch)[slot])
        shard = self.shards[shard_index]
        docs = read_shard(self.data_dir / shard.name, shard.samples)
        order = np.random.default_rng([self.seed, self.id, epoch, shard_index]).permutation(len(docs))
        eot = np.array([self.eot])
        return [np.concatenate([docs[i].astype(np.int64), eot]) for i in order]

    def sequences(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        need = self.seq_len + 1
        pieces: list[np.ndarray] = []
        have = 0
        epoch, slot, doc, token = start.epoch, start.shard, start.doc, start.token
        while True:
            docs = self._documents(epoch, slot)
            while doc < len(docs):
                tokens = docs[doc]
                while token < len(tokens):
                    take = min(need - have, len(tokens) - token)
                    pieces.append(tokens[token:token + take])
                    have += take
                    token += take
                    if have == need:
                        yield np.concatenate(pieces), self._next_start(epoch, slot, doc, token, docs)
                        pieces, have = [], 0
                doc, token = doc + 1, 0
            slot, doc = slot + 1, 0
            if slot == len(self.shards):
                epoch, slot = epoch + 1, 0

    def _next_start(self, epoch: int, slot: int, doc: int, token: int, docs: list) -> StreamPosition:
        """The position just after (doc, token), carried over document, shard and epoch ends."""
        if token == len(docs[doc]):
            doc, token = doc + 1, 0
        if doc == len(docs):
            slot, doc = slot + 1, 0
        if slot == len(self.shards):
            epoch, slot = epoch + 1, 0
        return StreamPosition(epoch, slot, doc, token)


class _StepChunks(IterableDataset):
    """Yields, for each step, one chunk per owned stream: (stream id, sequences, position after)."""

    def __init__(self, streams: list[Stream], per_stream: int, positions: dict[int, StreamPosition]):
        self.streams, self.per_stream, self.positions = streams, per_stream, positions

    def __iter__(self):
        info = get_worker_info()
        mine = self.streams if info is None else self.streams[info.id::info.num_workers]
        iters = [s.sequences(self.positions[s.id]) for s in mine]
        while True:
            for stream, it in zip(mine, iters):
                seqs, pos = zip(*(next(it) for _ in range(self.per_stream)))
                yield stream.id, torch.from_numpy(np.stack(seqs)), asdict(pos[-1])


class TrainLoader:
    """Per-rank iterator of training steps; each step is a (micro_batches, seq_len + 1) tensor list.

    Its state is the position of every stream after the last step handed out. ``state_dict()`` is
    collective over the data-parallel group: it gathers all ranks' streams, so the state is the
    same on every rank and resumes on any layout. ``load_state_dict`` must come before the first
    step (the streams start reading, in worker processes, at the first ``next``).
    """

    def __init__(self, data_dir: str | Path, manifest: DataManifest, *, seq_len: int, streams: int, dp_rank: int,
                 dp_size: int, dp_group, micro_batch_size: int, grad_accum: int, num_workers: int, seed: int):
        data_dir = Path(data_dir)
        if len(manifest.train) < streams:
            raise DataError(f"{data_dir}: {len(manifest.train)} train shards cannot feed data.streams={streams}; "
                            f"prepare with data.streams={streams} or use fewer streams")
        self.micro_batch_size, self.num_workers, self.dp_group = micro_batch_size, num_workers, dp_group
        self.per_stream = micro_batch_size * grad_accum * dp_size // streams
        self.streams = streams
        self.owned = list(range(dp_rank, streams, dp_size))
        self.positions = {s: StreamPosition() for s in self.owned}
        shards_of = [[sh for i, sh in enumerate(manifest.train) if i % streams == s] for s in range(streams)]
        self._streams = [Stream(data_dir, shards_of[s], s, seq_len, manifest.eot_id, seed) for s in self.owned]
        self._chunks = None  # the DataLoader's iterator, started by the first step

    def __iter__(self):
        return self

    def __next__(self) -> list[torch.Tensor]:
        if self._chunks is None:
            dataset = _StepChunks(self._streams, self.per_stream, dict(self.positions))
            workers = self.num_workers
            self._chunks = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                           persistent_workers=workers > 0, prefetch_factor=4 if workers else None))
        chunks = {}
        for _ in self.owned:
            stream_id, seqs, pos = next(self._chunks)
            chunks[stream_id] = seqs
            self.positions[stream_id] = StreamPosition(**pos)
        batch = torch.cat([chunks[s] for s in self.owned])
        return list(batch.split(self.micro_batch_size))

    def local_positions(self) -> dict[str, dict]:
        """This rank's streams' positions (stream id as a string, as in JSON)."""
        return {str(s): asdict(p) for s, p in self.positions.items()}

    def state_dict(self) -> dict:
        """Positions of all streams (collective over the data-parallel group)."""
        gathered = [None] * dist.get_world_size(self.dp_group)
        dist.all_gather_object(gathered, self.local_positions(), group=self.dp_group)
        return {"streams": self.streams, "positions": {k: v for part in gathered for k, v in part.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self._chunks is not None:
            raise RuntimeError("TrainLoader.load_state_dict after the first step: the streams already started")
        if state["streams"] != self.streams:
            raise DataError(f"data.streams: the checkpoint's data position is for {state['streams']} streams, "
                            f"this run has {self.streams}; resume with data.streams={state['streams']}")
        self.positions = {s: StreamPosition(**state["positions"][str(s)]) for s in self.owned}


VAL_TOKEN_CAP = 16_000_000  # validation sequences are drawn from at most this many tokens


def validation_sequences(data_dir: str | Path, manifest: DataManifest, seq_len: int, count: int) -> torch.Tensor:
    """``count`` sequences spread evenly over the validation split (fewer if it is small).

    Spreading them matters: the first few documents alone are not a fair sample of the corpus.
    """
    data_dir = Path(data_dir)
    need = seq_len + 1
    pieces, have = [], 0
    eot = np.array([manifest.eot_id], dtype=np.int32)
    for shard in manifest.val:
        for doc in read_shard(data_dir / shard.name, shard.samples):
            pieces += [doc.astype(np.int32), eot]
            have += len(doc) + 1
        if have >= VAL_TOKEN_CAP:
            break
    n = min(count, have // need)
    if n == 0:
        raise DataError(f"{data_dir}: the validation split has {have} tokens, fewer than one sequence of "
                        f"{need}; raise data.val_fraction or lower data.seq_len")
    if n < count:
        log.warning("data: validation split holds only %d sequences of %d tokens (asked for %d)", n, need, count)
    tokens = np.concatenate(pieces)
    starts = np.linspace(0, len(tokens) - need, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + need] for s in starts]).astype(np.int64))

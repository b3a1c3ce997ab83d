"""The training data of a run: its prepared sources, how a global batch is shared between them, and
where every sequence of an epoch comes from.

A run reads one prepared directory (``data.dir``) or several mixed by weight (``data.mix``). The
global batch of B sequences is cut into B *lanes*; source k owns ``B_k`` of them, its weight's share
(largest remainder, so ``|B_k / B - w_k| < 1 / B`` and the proportions are exact in every step).

One epoch of a source is its training shards in a seeded order, each shard's documents in a seeded
bounded-buffer shuffle, each document followed by end-of-text: one long token stream whose length
is known from ``index.json`` alone. It is cut into sequences of ``seq_len + 1`` tokens, and lane j
of the source's ``B_k`` lanes takes the j-th contiguous block of them, one sequence per step. So the
sequence of lane j at step t is a function of (j, t) only: which rank or loader worker reads the
lane does not change it, a resume needs nothing but the step, and data-parallel ranks, which take
contiguous lanes, each read a contiguous ~1/dp of every epoch's shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from megalm.config import DataConfig, MixSource
from megalm.data.location import Location
from megalm.data.manifest import DataManifest, ShardEntry
from megalm.errors import DataError

log = logging.getLogger("megalm.data")


def mix_sources(cfg: DataConfig) -> list[MixSource]:
    """``data.mix``, or ``data.dir`` as the one source."""
    return list(cfg.mix) or [MixSource(dir=cfg.dir, weight=1.0, shards=cfg.shards)]


def apportion(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares), kind="stable")[: total - shares.sum()]:
        shares[i] += 1
    return [int(s) for s in shares]


@dataclass
class TrainSource:
    """One prepared dataset as a run reads it: ``lanes`` rows of every global batch."""

    index: int  # position in data.mix (seeds its shuffles)
    location: Location
    manifest: DataManifest
    lanes: int
    seq_len: int
    seed: int
    shuffle_tokens: int

    @property
    def name(self) -> str:
        return Path(self.location.base.rstrip("/")).name or self.location.base

    @cached_property
    def shard_lengths(self) -> np.ndarray:
        """Tokens each training shard adds to the epoch stream (its documents and their end-of-text)."""
        return np.array([s.tokens + s.samples for s in self.manifest.train], dtype=np.int64)

    @cached_property
    def steps_per_epoch(self) -> int:
        sequences = int(self.shard_lengths.sum()) // (self.seq_len + 1)
        return sequences // self.lanes

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.manifest.train))

    def epoch_offsets(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards in this epoch's order, and where each starts in the epoch's token stream."""
        order = self.shard_order(epoch)
        starts = np.concatenate([[0], np.cumsum(self.shard_lengths[order])[:-1]])
        return order, starts

    def document_rng(self, epoch: int, shard: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, epoch, shard, 1])

    def shard(self, i: int) -> ShardEntry:
        return self.manifest.train[i]


def open_sources(cfg: DataConfig, global_batch: int) -> list[TrainSource]:
    """Every source's manifest read (from wherever it lives) and its lanes assigned; sources must
    share one tokenizer and each must fill its lanes for at least one step per epoch."""
    mix = mix_sources(cfg)
    lanes = apportion([m.weight for m in mix], global_batch)
    sources = []
    for i, (m, n) in enumerate(zip(mix, lanes)):
        where = f"data.mix[{i}]" if cfg.mix else "data.dir"
        if n == 0:
            raise DataError(f"{where}: weight {m.weight} gives this source no row of the global batch of "
                            f"{global_batch}; raise its weight or train.global_batch")
        location = Location(m.dir, m.shards, cfg.cache_dir)
        source = TrainSource(i, location, location.manifest(), n, cfg.seq_len, cfg.seed, cfg.shuffle_tokens)
        if not source.manifest.train:
            raise DataError(f"{where}: {m.dir} has no training shards")
        if source.steps_per_epoch == 0:
            raise DataError(f"{where}: {m.dir} holds {int(source.shard_lengths.sum())} tokens, fewer than its "
                            f"{n} rows of the global batch need for one step of seq_len {cfg.seq_len}")
        sources.append(source)
    first = sources[0]
    for s in sources[1:]:
        if s.manifest.tokenizer_hash != first.manifest.tokenizer_hash:
            raise DataError(f"data.mix[{s.index}]: {s.location} was prepared with another tokenizer than "
                            f"{first.location} (tokenizer hash {s.manifest.tokenizer_hash[:12]} vs "
                            f"{first.manifest.tokenizer_hash[:12]}); prepare it with data.tokenizer="
                            f"{first.location}/tokenizer.json")
    for s in sources:
        used = s.steps_per_epoch * s.lanes * (s.seq_len + 1)
        log.info("data: %s: %d lanes of the global batch (%.1f%%), %d steps per epoch, %d of %d tokens per epoch "
                 "used (the rest is shorter than one step)", s.location, s.lanes, 100 * s.lanes / global_batch,
                 s.steps_per_epoch, used, int(s.shard_lengths.sum()))
    return sources

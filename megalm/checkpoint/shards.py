"""A rank's checkpoint files: writing them with checksums, and reading them back on any layout.

Every rank writes two files into the checkpoint directory:

    rank_NNNNN.bin    float32 values of the rank's fragments (fragments.py): for each fragment its
                      fp32 master values, then each Adam moment, at ``Fragment.offset`` (masters
                      only in a checkpoint without optimizer state, e.g. an imported model)
    rank_NNNNN.pt     the rank's index: its fragments, how many values each element has, Adam's
                      step, and its per-rank parts' states

Checksums (xxh3-64) are computed while the bytes are written, so they cost no second pass over
the data. ``CheckpointReader`` reassembles any parameter of the one-process model from whichever
ranks wrote its fragments, so a checkpoint loads on a layout other than the one that saved it.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import xxhash

from megalm.checkpoint.fragments import Fragment
from megalm.checkpoint.meta import CheckpointMeta, FileEntry
from megalm.common import CHUNK
from megalm.errors import CheckpointError
from megalm.parallel.tensor_parallel import Shard

KINDS = 3  # values per element: master, exp_avg, exp_avg_sq


def data_file(rank: int) -> str:
    return f"rank_{rank:05d}.bin"


def index_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def write_file(path: Path, *pieces) -> FileEntry:
    """Write bytes-like ``pieces`` to ``path``, one after another, in chunks, checksumming as it
    goes; fsync."""
    digest, size = xxhash.xxh3_64(), 0
    with open(path, "wb") as f:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), CHUNK):
                chunk = view[start:start + CHUNK]
                digest.update(chunk)
                f.write(chunk)
            size += len(view)
        f.flush()
        os.fsync(f.fileno())
    return FileEntry(size=size, xxh3=digest.hexdigest())


def write_rank(directory: Path, rank: int, values: list[torch.Tensor], index: dict) -> dict[str, FileEntry]:
    """This rank's two files (``values``: flat float32 host tensors, written one after another);
    returns their sizes and checksums."""
    buffer = io.BytesIO()
    torch.save(index, buffer)
    return {data_file(rank): write_file(directory / data_file(rank), *(v.numpy() for v in values)),
            index_file(rank): write_file(directory / index_file(rank), buffer.getbuffer())}


def rank_index(fragments: list[Fragment], adam_step: int, parts: dict, kinds: int = KINDS) -> dict:
    return {"fragments": [asdict(f) for f in fragments], "kinds": kinds, "adam_step": adam_step, "parts": parts}


class CheckpointReader:
    """Any parameter's full fp32 master and moments, assembled from a checkpoint of any layout."""

    def __init__(self, ckpt: Path, meta: CheckpointMeta):
        self.ckpt, self.meta = ckpt, meta
        self.indexes = [self._load_index(r) for r in range(meta.layout.world_size)]
        self._data: dict[int, np.ndarray] = {}
        self.by_name: dict[str, list[tuple[int, Fragment]]] = {}
        for rank, index in enumerate(self.indexes):
            for raw in index["fragments"]:
                f = Fragment(**{**raw, "shard_parts": tuple(raw["shard_parts"]), "shape": tuple(raw["shape"])})
                self.by_name.setdefault(f.name, []).append((rank, f))
        self.adam_step = max(index["adam_step"] for index in self.indexes)

    def _load_index(self, rank: int) -> dict:
        path = self.ckpt / index_file(rank)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises assorted types for torn or foreign files
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None

    def names(self) -> list[str]:
        return list(self.by_name)

    def parts(self, rank: int) -> dict:
        """The per-rank parts' states that rank ``rank`` saved."""
        return self.indexes[rank]["parts"]

    def values(self, rank: int, f: Fragment) -> list[torch.Tensor]:
        """A fragment's master values and moments (zeros where the checkpoint has none)."""
        if rank not in self._data:  # copy-on-write: torch may view it without copying, the file stays as it is
            self._data[rank] = np.memmap(self.ckpt / data_file(rank), dtype=np.float32, mode="c")
        data, kinds = self._data[rank], self.indexes[rank]["kinds"]
        values = [torch.from_numpy(data[f.offset + k * f.numel:f.offset + (k + 1) * f.numel]) for k in range(kinds)]
        return values + [torch.zeros(f.numel) for _ in range(KINDS - kinds)]

    def local(self, name: str, shard: Shard | None, tp_rank: int, tp: int) -> list[torch.Tensor]:
        """Parameter ``name``'s master and moments as tensor rank ``tp_rank`` of ``tp`` holds them,
        split by ``shard`` (None: replicated, the full tensor). Reads only that shard's fragments
        when the checkpoint was split the same way."""
        entries = self.by_name.get(name)
        if not entries:
            raise CheckpointError(f"{self.ckpt}: holds no values for parameter {name}")
        saved = entries[0][1]
        saved_shard = Shard(saved.shard_dim, saved.shard_parts) if saved.shard_dim >= 0 else None
        if saved_shard is not None and saved_shard == shard and saved.tp == tp:
            return self._shard(name, entries, tp_rank)
        if saved_shard is None:
            full = self._shard(name, entries, 0)
        else:
            pieces = [self._shard(name, entries, t) for t in range(saved.tp)]
            full = [saved_shard.join([piece[k] for piece in pieces]) for k in range(KINDS)]
        return full if shard is None else [shard.take(t, tp_rank, tp) for t in full]

    def full(self, name: str) -> torch.Tensor:
        """The one-process parameter ``name``'s fp32 master value."""
        return self.local(name, None, 0, 1)[0]

    def model_state(self) -> dict[str, torch.Tensor]:
        """The one-process model's state dict (fp32), whatever layout saved it."""
        return {name: self.full(name) for name in self.names()}

    def _shard(self, name: str, entries: list[tuple[int, Fragment]], t: int) -> list[torch.Tensor]:
        """Tensor rank ``t``'s shard as saved: master and moments, assembled from its fragments."""
        shape = entries[0][1].shape
        numel = int(np.prod(shape))
        shard = [torch.empty(numel) for _ in range(KINDS)]
        covered = 0
        for rank, f in entries:
            if f.tp_rank == t:
                for buf, values in zip(shard, self.values(rank, f)):
                    buf[f.start:f.start + f.numel] = values
                covered += f.numel
        if covered != numel:
            raise CheckpointError(f"{self.ckpt}: parameter {name}, tensor shard {t}: the rank files hold {covered} "
                                  f"of its {numel} values (a rank's files are missing or from another checkpoint)")
        return [b.view(shape) for b in shard]

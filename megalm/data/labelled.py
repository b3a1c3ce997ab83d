"""Labelled texts for classification (``train.task=classify``): reading ``{text, label}`` jsonl,
tokenizing, and the training set's global batches in a seeded, resumable order.

A text becomes at most ``max_len`` token ids, right-padded with ``PAD`` (never a token id). Its
target is (label index, position of the hidden state the classifier reads: megalm.model.classifier).
The training order is a fresh permutation of the set per epoch, drawn from the seed, and the
loader's whole state is how many examples it has handed out: after a resume the next global batch
is the one an uninterrupted run takes, whatever the number of data-parallel ranks (the global batch
is the invariant, as in pretraining).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from tokenizers import Tokenizer

from megalm.common import IGNORE, PAD
from megalm.config import BatchLayout
from megalm.data.loader import Step, check_identity
from megalm.errors import DataError


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str | None  # None: unlabelled (prediction input)
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_records(path: str | Path, need_label: bool = True) -> list[LabelledText]:
    """The records of a jsonl file; a bad line is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected .jsonl records with fields text and label)")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    records.append(_record(line, path, number, need_label))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not records:
        raise DataError(f"{path}: holds no records (expected one JSON object per line with text and label)")
    return records


def _record(line: str, path: Path, number: int, need_label: bool) -> LabelledText:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields text and label")
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no text (expected a non-empty string field \"text\")")
    if label is None and need_label:
        raise DataError(f"{where}: no label (expected a field \"label\")")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f"{where}: label {label!r} is neither a string nor an integer")
    return LabelledText(text, None if label is None else str(label), path, number)


def encode_texts(tok: Tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    """Token ids (N, T) of the texts, each cut to ``max_len`` and right-padded with PAD to the
    longest of them."""
    ids = [e.ids[:max_len] for e in tok.encode_batch_fast(texts)]
    out = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.int64)
    for row, seq in zip(out, ids):
        row[:len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return out


def trim(ids: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row (less work, the same result), keeping
    a multiple of ``multiple`` columns (sequence parallelism splits them over tensor ranks)."""
    length = max(1, int((ids != PAD).sum(1).max()))
    length = -(-length // multiple) * multiple
    if length > ids.shape[1]:
        return torch.cat([ids, torch.full((len(ids), length - ids.shape[1]), PAD, dtype=ids.dtype)], dim=1)
    return ids[:, :length]


def targets(ids: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 2) rows of (label index, the position the classifier reads): the last real token of a
    causal model, the first of a masked one."""
    positions = ((ids != PAD).sum(1) - 1).clamp(min=0) if causal else torch.zeros_like(labels)
    return torch.stack([labels, positions], dim=1)


@dataclass
class LabelledSet:
    ids: torch.Tensor  # (N, T) token ids, PAD after each text
    labels: torch.Tensor  # (N,) index into the run's label list

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        return xxhash.xxh3_64_hexdigest(self.ids.numpy().tobytes() + self.labels.numpy().tobytes())


def labelled_set(records: list[LabelledText], tok: Tokenizer, labels: list[str], max_len: int) -> LabelledSet:
    index = {label: i for i, label in enumerate(labels)}
    unknown = next((r for r in records if r.label not in index), None)
    if unknown is not None:
        raise DataError(f"{unknown.where}: label {unknown.label!r} is not one of the run's labels {labels} "
                        f"(those of the training file, or finetune.labels)")
    return LabelledSet(encode_texts(tok, [r.text for r in records], max_len),
                       torch.tensor([index[r.label] for r in records], dtype=torch.int64))


class ClassifyLoader:
    """This rank's micro-batches of each global batch of the training set (stateful: the position).
    Each micro-batch is as long as its longest text, rounded up to a multiple of ``multiple``
    (sequence parallelism splits the columns over tensor ranks)."""

    def __init__(self, data: LabelledSet, layout: BatchLayout, dp_rank: int, seed: int, *, causal: bool,
                 multiple: int = 1):
        self.data, self.layout, self.dp_rank, self.seed = data, layout, dp_rank, seed
        self.causal, self.multiple = causal, multiple
        self.position = 0  # examples handed out so far, over all ranks and epochs
        self._epoch, self._order = -1, np.zeros(0, np.int64)

    @property
    def epoch(self) -> float:
        return self.position / len(self.data)

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        """This rank's rows of the next global batch as (ids, target) micro-batches, then rows that
        carry no loss (label IGNORE) where the data-parallel ranks do not split it evenly."""
        picked = self._next_global_batch()
        rows = self.layout.rows(self.dp_rank)
        mine = picked[rows.start:rows.stop]
        ids, labels = self.data.ids[mine], self.data.labels[mine]
        real = len(ids)
        fill = self.layout.micro_batch_size * self.layout.grad_accum - real
        if fill:
            ids = torch.cat([ids, self.data.ids[:1].expand(fill, -1)])
            labels = torch.cat([labels, torch.full((fill,), IGNORE, dtype=labels.dtype)])
        size = self.layout.micro_batch_size
        batches = [(trim(i, self.multiple), y) for i, y in zip(ids.split(size), labels.split(size))]
        return Step([(i, targets(i, y, self.causal)) for i, y in batches], ids[:real], loss_tokens=real,
                    tokens=int((ids[:real] != PAD).sum()), tokens_by_source=[], bad_shards=[])

    def _next_global_batch(self) -> torch.Tensor:
        """The next ``global_batch`` example indices of the epochs' permutations, one after another."""
        n, picked = len(self.data), []
        while sum(map(len, picked)) < self.layout.global_batch:
            epoch, offset = divmod(self.position, n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
            take = min(self.layout.global_batch - sum(map(len, picked)), n - offset)
            picked.append(self._order[offset:offset + take])
            self.position += take
        return torch.from_numpy(np.concatenate(picked))

    def state_dict(self) -> dict:
        return {"position": self.position, **self._identity()}

    def _identity(self) -> dict:
        """What the order depends on besides the position: a resume must keep it."""
        return {"examples": len(self.data), "fingerprint": self.data.fingerprint(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_identity(self._identity(), state, "finetune", "resume with the same training file, finetune.max_len "
                       "and data.seed, or start a new train.run_dir")
        self.position = int(state["position"])

"""Scoring held-out data on any layout: the forward passes alone (``forward_only``), and for
language models the exact mean loss over validation sequences (and, for masked LM, the share of
masked tokens predicted exactly: ``score``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm.common import IGNORE
from megalm.parallel.context_parallel import sequence_part
from megalm.parallel.mesh import Mesh
from megalm.train.objective import EVAL_STEP, CausalLM
from megalm.train.pipeline import pipeline_forward


def to_device(target, device: torch.device):
    """A micro-batch's target (a tensor, or a tuple of them) on ``device``."""
    if isinstance(target, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in target)
    return target.to(device, non_blocking=True)


def per_rank_rows(n: int, mesh: Mesh, batch_size: int) -> int:
    """Rows each data-parallel rank scores of ``n`` split over the ranks: the same number on every
    rank, in whole micro-batches (ZeRO-3 and the pipeline engine need that)."""
    return -(-(-(-n // mesh.data_parallel)) // batch_size) * batch_size


def loss_rank(engine, mesh: Mesh) -> int:
    """The pipeline rank whose loss function sees the logits (the last chunk's; 0 without a pipeline)."""
    return engine.module.last_rank if mesh.pp > 1 else 0


@torch.no_grad()
def forward_only(engine, batches: list, mesh: Mesh, device: torch.device, progress=None) -> float:
    """Collective: the loss summed over every data-parallel rank's ``batches`` of (inputs, target),
    in evaluation mode, on any layout (targets carry scale 1: the loss functions' sums).
    ``progress``, if given, is handed the list of batches and yields them (e.g. through a bar)."""
    stream = progress(batches) if progress else iter(batches)
    engine.eval()
    try:
        if mesh.pp > 1:
            total = pipeline_forward(engine.module, mesh, ((x, to_device(y, device)) for x, y in stream), device)
        else:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for x, y in stream:
                total += engine(x.to(device), to_device(y, device)).double()
        dist.all_reduce(total, group=mesh.dp_group)
        return total.item()
    finally:
        engine.train()


@dataclass
class Scores:
    loss: float  # mean cross-entropy over the labels that count, nats
    tokens: int  # labels that count
    accuracy: float | None  # share of them predicted exactly (argmax), when asked for


@torch.no_grad()
def score(engine, val: torch.Tensor, mesh: Mesh, batch_size: int, device: torch.device, objective=None,
          accuracy: bool = False, progress=None) -> Scores:
    """Score the validation sequences (rows of seq_len + 1 tokens) under ``objective`` (next-token by
    default), split across data-parallel ranks; the rows a rank lacks are filled with labels that do
    not count (IGNORE). Summed losses and label counts then give the exact mean over the set."""
    objective = objective or CausalLM()
    dp, rank = mesh.data_parallel, mesh.data_rank
    inputs, labels = objective.examples(val, None, EVAL_STEP, torch.arange(len(val)))
    per_rank = per_rank_rows(len(val), mesh, batch_size)
    filler = torch.arange(per_rank - len(inputs[rank::dp])) % len(inputs)  # rows to fill with, repeated if few
    inputs = sequence_part(torch.cat([inputs[rank::dp], inputs[filler]]), mesh)
    labels = sequence_part(torch.cat([labels[rank::dp], torch.full_like(labels[filler], IGNORE)]), mesh)
    one = torch.ones((), dtype=torch.float32)
    batches = [(x, (y, one)) for x, y in zip(inputs.split(batch_size), labels.split(batch_size))]
    counted = int((labels != IGNORE).sum())
    loss_fn = engine.module.loss_fn  # Transformer and PipelineModel both hold it
    loss_fn.correct = torch.zeros((), dtype=torch.int64, device=device) if accuracy else None
    try:
        total = forward_only(engine, batches, mesh, device, progress)
        sums = torch.tensor([counted, 0], dtype=torch.int64, device=device)
        if accuracy and mesh.tp_rank == 0 and mesh.pp_rank == loss_rank(engine, mesh):  # where the loss ran, once per replica
            sums[1] = loss_fn.correct
        dist.all_reduce(sums)
        tokens, correct = sums.tolist()
        tokens //= mesh.tp * mesh.pp  # every rank of a replica counted its labels
    finally:
        loss_fn.correct = None
    return Scores(total / max(tokens, 1), tokens, correct / max(tokens, 1) if accuracy else None)

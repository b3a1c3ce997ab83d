"""Validation: the exact mean loss over held-out sequences (and, for masked LM, the share of masked
tokens predicted exactly), on any layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm.parallel.mesh import Mesh
from megalm.parallel.tensor_parallel import IGNORE
from megalm.train.objective import EVAL_STEP, CausalLM


@dataclass
class Scores:
    loss: float  # mean cross-entropy over the labels that count, nats
    tokens: int  # labels that count
    accuracy: float | None  # share of them predicted exactly (argmax), when asked for


@torch.no_grad()
def score(engine, val: torch.Tensor, mesh: Mesh, batch_size: int, device: torch.device, objective=None,
          accuracy: bool = False, progress=None) -> Scores:
    """Score the validation sequences (rows of seq_len + 1 tokens) under ``objective`` (next-token by
    default), split across data-parallel ranks. ``progress``, if given, is handed this rank's list of
    micro-batches and yields them (e.g. through a progress bar).

    Every data-parallel rank runs the same number of equal micro-batches (ZeRO-3 and the pipeline
    engine need that): the rows a rank lacks are filled with labels that do not count (IGNORE).
    Summed losses and label counts then give the exact mean over the validation set.
    """
    objective = objective or CausalLM()
    dp, rank = mesh.dp, mesh.dp_rank
    inputs, labels = objective.examples(val, None, EVAL_STEP, torch.arange(len(val)))
    per_rank = -(-len(val) // dp)
    per_rank = -(-per_rank // batch_size) * batch_size
    filler = torch.arange(per_rank - len(inputs[rank::dp])) % len(inputs)  # rows to fill with, repeated if few
    inputs = torch.cat([inputs[rank::dp], inputs[filler]])
    labels = torch.cat([labels[rank::dp], torch.full_like(labels[filler], IGNORE)])
    batches = list(zip(inputs.split(batch_size), labels.split(batch_size)))
    stream = progress(batches) if progress else iter(batches)
    counted = int((labels != IGNORE).sum())
    loss_fn = engine.module.loss_fn  # Transformer and PipelineModule both hold it
    saved = loss_fn.reduction, loss_fn.scale  # training's scaled sum, put back afterwards
    loss_fn.reduction, loss_fn.scale = "sum", 1.0
    loss_fn.correct = torch.zeros((), dtype=torch.int64, device=device) if accuracy else None
    engine.eval()
    try:
        if mesh.pp > 1:
            # eval_batch averages the per-micro-batch sums over micro-batches and data-parallel ranks
            mean_sum = engine.eval_batch(stream, num_micro_batches=len(batches))
            total = mean_sum.double().item() * len(batches) * dp
        else:
            total_t = torch.zeros(1, dtype=torch.float64, device=device)
            for x, y in stream:
                total_t += engine(x.to(device), y.to(device)).double()
            dist.all_reduce(total_t, group=mesh.dp_group)
            total = total_t.item()
        sums = torch.tensor([counted, 0], dtype=torch.int64, device=device)
        if accuracy and mesh.tp_rank == 0 and mesh.pp_rank == mesh.pp - 1:  # where the loss ran, once per replica
            sums[1] = loss_fn.correct
        dist.all_reduce(sums)
        tokens, correct = sums.tolist()
        tokens //= mesh.tp * mesh.pp  # every rank of a replica counted its labels
    finally:
        loss_fn.reduction, loss_fn.scale = saved
        loss_fn.correct = None
        engine.train()
    return Scores(total / max(tokens, 1), tokens, correct / max(tokens, 1) if accuracy else None)


"""Validation loss: the exact mean next-token loss over held-out sequences, on any layout."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel.mesh import Mesh
from megalm.parallel.tensor_parallel import IGNORE


@torch.no_grad()
def evaluate(engine, val: torch.Tensor, mesh: Mesh, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over the validation sequences, split across data-parallel ranks.

    Every data-parallel rank runs the same number of equal micro-batches (ZeRO-3 and the pipeline
    engine need that): the rows a rank lacks are filled with labels that do not count (IGNORE).
    Summed losses and token counts then give the exact mean over the validation set.
    """
    dp, rank = mesh.dp, mesh.dp_rank
    per_rank = -(-len(val) // dp)
    per_rank = -(-per_rank // batch_size) * batch_size
    mine = val[rank::dp]
    pad = per_rank - len(mine)
    inputs = torch.cat([mine[:, :-1], val[:pad, :-1]])
    labels = torch.cat([mine[:, 1:], torch.full_like(val[:pad, 1:], IGNORE)])
    batches = list(zip(inputs.split(batch_size), labels.split(batch_size)))
    tokens = float(len(val) * (val.shape[1] - 1))
    loss_fn = engine.module.loss_fn  # Transformer and PipelineModule both hold it
    saved = loss_fn.reduction, loss_fn.scale  # training's scaled sum, put back afterwards
    loss_fn.reduction, loss_fn.scale = "sum", 1.0
    engine.eval()
    try:
        if mesh.pp > 1:
            # eval_batch averages the per-micro-batch sums over micro-batches and data-parallel ranks
            mean_sum = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            total = mean_sum.double().item() * len(batches) * dp
        else:
            total_t = torch.zeros(1, dtype=torch.float64, device=device)
            for x, y in batches:
                total_t += engine(x.to(device), y.to(device)).double()
            dist.all_reduce(total_t, group=mesh.dp_group)
            total = total_t.item()
    finally:
        loss_fn.reduction, loss_fn.scale = saved
        engine.train()
    return total / tokens

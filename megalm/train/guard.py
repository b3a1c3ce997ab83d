"""Non-finite steps skipped: a NaN or infinite loss or gradient on any rank leaves the weights, the
Adam moments and Adam's step count as they were, on every rank, and training goes on.

The decision rides on the gradient-norm reduction the step already makes, so it adds no
synchronisation: a non-finite value anywhere makes the global norm non-finite on every rank.
DeepSpeed's sharded optimizers (ZeRO 1-3, and its bf16 optimizer) already skip such a step when
their norm is not finite (``bf16.check_grad_overflow`` turns it on for bf16 with ZeRO 1-2: see
engine.py); its plain fp32 path (ZeRO 0) does not, so ``guard_plain_optimizer`` gives that
optimizer the same behaviour: it takes over the clipping DeepSpeed would do there (same function,
same collectives) and steps only when the norm is finite. Either way DeepSpeed counts the step in
``engine.skipped_steps`` and leaves its learning-rate scheduler alone; ``StepGuard.skipped`` reads
that count, and advances the scheduler itself, so the learning rate stays a function of the step
number (which a resume relies on: checkpoint/store.py).
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist


def plain_fp32(zero_stage: int, precision: str) -> bool:
    """Whether DeepSpeed steps a plain torch optimizer (no overflow check of its own)."""
    return zero_stage == 0 and precision == "fp32"


def guard_plain_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mesh, max_norm: float) -> None:
    """Make the plain fp32 path's optimizer skip a non-finite step as DeepSpeed's own optimizers do
    (called as the engine is built, before a learning-rate scheduler wraps ``optimizer.step``).
    DeepSpeed's clipping must be off there (``gradient_clipping`` 0 in its config): this clips
    ``model``'s gradients to ``max_norm`` instead (0: no clipping, the norm is still taken)."""
    inner_step = optimizer.step
    optimizer.overflow = False  # what DeepSpeed's engine reads after the step, as with its own optimizers

    def step(optimizer, closure=None):
        norm = clip_gradients(list(model.parameters()), max_norm, mesh)
        optimizer._global_grad_norm = norm  # the engine reports it (get_global_grad_norm)
        optimizer.overflow = not bool(torch.isfinite(norm).all())
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return inner_step(closure)

    optimizer.step = types.MethodType(step, optimizer)  # a bound method, as a scheduler expects to wrap


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, mesh) -> torch.Tensor:
    """The gradient norm of the whole model, the same on every rank (gradients are already averaged
    over data-parallel ranks), then the gradients scaled down to ``max_norm`` if above it (0: never),
    as DeepSpeed clips. Each weight counts once: a tensor-parallel shard on its rank, a replicated
    weight on tensor rank 0, a pipeline's copy of a tied weight not at all; the squares are summed
    over the model-parallel group (the tensor and pipeline ranks of one replica)."""
    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad.detach().float().norm() for p in params if p.grad is not None
               and not getattr(p, "pipeline_copy", False) and (getattr(p, "model_parallel", False) or mesh.tp_rank == 0)]
    total = torch.stack(counted).pow(2).sum() if counted else torch.zeros((), device=grads[0].device)
    if mesh.tp * mesh.pp > 1:
        dist.all_reduce(total, group=mesh.model_group)
    norm = total.sqrt()
    coef = (max_norm or math.inf) / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm


class StepGuard:
    """Tells, after each optimizer step, whether it was skipped."""

    def __init__(self, engine):
        self.engine = engine
        self._seen = engine.skipped_steps

    def skipped(self) -> bool:
        """Whether the optimizer step just taken was skipped (non-finite). If so, the learning-rate
        schedule still moves on, as for a step taken."""
        if self.engine.skipped_steps == self._seen:
            return False
        self._seen = self.engine.skipped_steps
        self.engine.lr_scheduler.step()
        return True

"""Context parallelism (``parallel.cp``): each sequence split across the cp ranks of its group, in
order (rank c holds positions [c·s/cp, (c+1)·s/cp)), and attention computed over the whole sequence
by DeepSpeed-Ulysses' all-to-all: before attention each rank trades its sequence part of every head
for the whole sequence of 1/cp of the heads, and back after it.

Everything but attention works on a token alone (norms, MLP, residuals, the loss), so it runs on the
rank's part as it is; attention, run whole over its heads, needs no load balancing for the causal
mask and no merging of partial results, and any attention kernel runs it unchanged (the Triton flash
kernel, SDPA, either mask). Its limit: the heads (key/value heads too, after tensor parallelism) must
be divisible among the cp ranks, or fewer key/value heads than ranks repeated up to them
(docs: DEVELOPERS.md, "Context parallelism").

The cp ranks of a sequence hold the same weights, as data-parallel replicas do: the mesh counts them
among its ``dp`` replicas (gradients averaged, ZeRO sharded, checkpoints written over all of them),
and splits each data-parallel rank into ``cp`` (``Mesh.data_rank``, ``Mesh.cp_rank``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.common import IGNORE
from megalm.parallel.mesh import Mesh

if TYPE_CHECKING:
    from megalm.data.loader import Step

SEQ_DIM, HEAD_DIM = 1, 2  # attention's q, k, v: (batch, sequence, heads, head_dim)


def _all_to_all(x: torch.Tensor, group, split: int, join: int) -> torch.Tensor:
    """Split dim ``split`` of ``x`` into the group's size parts, send part c to rank c, and join what
    comes back along dim ``join`` (in rank order)."""
    n = dist.get_world_size(group)
    parts = torch.stack(x.chunk(n, dim=split)).contiguous()  # (n, ...): part c goes to rank c
    received = torch.empty_like(parts)
    dist.all_to_all_single(received, parts, group=group)
    return torch.cat(received.unbind(0), dim=join)


class _SequenceToHeads(torch.autograd.Function):
    """(B, s/cp, H, D) this rank's part of the sequence -> (B, s, H/cp, D) the whole sequence of its
    share of the heads; backward the reverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group, HEAD_DIM, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, SEQ_DIM, HEAD_DIM), None


class _HeadsToSequenceLinear(torch.autograd.Function):
    """``F.linear(heads_to_sequence(y), W)`` keeping only ``y`` for backward (the attention kernel
    keeps it as well: one tensor kept, not two), the all-to-all done again in backward for W's gradient
    (as a column-parallel linear with SP gathers its input again)."""

    @staticmethod
    def forward(ctx, y, weight, group):
        ctx.group = group
        ctx.save_for_backward(y, weight)
        return F.linear(_all_to_all(y, group, SEQ_DIM, HEAD_DIM).flatten(2), weight)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        grad_input = (grad @ weight).view(*grad.shape[:2], -1, y.shape[-1])  # (B, s/cp, H, D)
        grad_y = _all_to_all(grad_input, ctx.group, HEAD_DIM, SEQ_DIM)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            z = _all_to_all(y, ctx.group, SEQ_DIM, HEAD_DIM).flatten(2)
            grad_weight = grad.flatten(0, -2).t() @ z.flatten(0, -2)
        return grad_y, grad_weight, None


def output_projection(mesh: Mesh, product=F.linear):
    """How attention's output (B, s, H/cp, D) meets its output projection's weight: on one context
    rank the layer's ``product`` of the heads flattened; with cp, back to this rank's part of the
    sequence inside the matmul (``_HeadsToSequenceLinear``: bf16 or fp32 only, as config checks)."""
    if mesh.cp == 1:
        return lambda y, weight: product(y.flatten(2), weight)
    return lambda y, weight: _HeadsToSequenceLinear.apply(y, weight, mesh.cp_group)


def sequence_to_heads(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Attention's input (q, k or v) on a context-parallel mesh: the whole sequence, 1/cp of the heads.
    Fewer heads than cp ranks (key/value heads of grouped-query attention) are repeated up to cp first,
    each rank then holding the one its query heads read."""
    if mesh.cp == 1:
        return x
    heads = x.shape[HEAD_DIM]
    if heads < mesh.cp:
        x = x.repeat_interleave(mesh.cp // heads, dim=HEAD_DIM)
    return _SequenceToHeads.apply(x, mesh.cp_group)


def sequence_part(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's part of a batch of sequences (B, s, ...): positions [cp_rank·s/cp, (cp_rank+1)·s/cp)."""
    if mesh.cp == 1:
        return x
    return x.chunk(mesh.cp, dim=1)[mesh.cp_rank].contiguous()


def first_position(length: int, mesh: Mesh) -> int:
    """The position in its sequence of the first of this rank's ``length`` tokens."""
    return mesh.cp_rank * length


def sequence_parts(step: Step, mesh: Mesh) -> Step:
    """A training step's data (megalm.data.loader.Step) cut to this rank's parts of its sequences: the
    labels that count recounted on the part, the tokens divided (rows are whole sequences, which cp
    divides). The step's record of which sequences and sources it read stays whole: rank cp 0 notes it."""
    if mesh.cp == 1:
        return step
    parts = [(sequence_part(inputs, mesh), sequence_part(labels, mesh)) for inputs, labels in step.micro_batches]
    counted = sum(int((labels != IGNORE).sum()) for _, labels in parts)
    return dataclasses.replace(step, micro_batches=parts, loss_tokens=counted, tokens=step.tokens // mesh.cp)

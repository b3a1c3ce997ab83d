"""Megatron-style tensor parallelism: the collectives at the edges of a parallel region, sharded
linear layers, a vocabulary-parallel embedding and cross-entropy, and layout-independent init.

A tensor-parallel region (attention over a slice of the heads, the MLP over a slice of its hidden
dim) is entered through its column-parallel linears and left through its row-parallel one, and
these edges hold all of its collectives, so they are easy to see:

=================  ==========================================  ==========================================
                   forward                                      backward
=================  ==========================================  ==========================================
enter (no SP)      identity                                     all-reduce the input's gradient
exit  (no SP)      all-reduce the partial outputs               identity
enter (SP)         all-gather the sequence shards               all-gather them again; reduce-scatter the
                                                                input's gradient along the sequence
exit  (SP)         reduce-scatter along the sequence            all-gather
=================  ==========================================  ==========================================

With sequence parallelism (SP) the activations between regions (norms, residuals, dropout) hold
only ``seq_len / tp`` positions per rank. Parameters used on such shards (norm weights, biases added
after a reduce-scatter) see only part of the batch, so their use goes through
:func:`replicated`, whose backward sums their gradient over the tensor-parallel group.

With SP a region keeps only its input's shard for backward, never the gathered sequence
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"):
:meth:`TPContext.column_parallel` runs all the linears that read the region's input in one autograd
function, which gathers the sequence once for all of them, and again in backward while it computes
the input's gradient, whose reduce-scatter then runs while it computes the weights' gradients. So a
layer keeps what a Megatron-LM layer keeps, all of it divided by t (s·b·h·34/t bytes in bf16 for a
GPT layer with dropout and flash attention), not s·b·h·(4 + 30/t): tests/test_activation_memory.py.

Every parameter is initialized from its *full* shape with a generator seeded by the run seed, its
layer's index and its name, then sliced to this rank's shard: a tp=2 run, a pp=2 run and one
process start from the same weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.common import IGNORE
from megalm.parallel.mesh import Mesh

SEQ_DIM = 1  # activations are (batch, sequence, hidden)


# ------------------------------------------------------------------------------ collectives


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


# With ``async_op`` these two start the collective and return a function that waits for it and
# returns its result, so that a backward pass computes while the collective runs.


def _all_gather_seq(x: torch.Tensor, group, async_op: bool = False, dim: int = SEQ_DIM):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(parts, x.contiguous(), group=group, async_op=async_op)

    def result() -> torch.Tensor:
        if work is not None:
            work.wait()
        return torch.cat(parts, dim=dim)

    return result if async_op else result()


def _reduce_scatter_seq(x: torch.Tensor, group, async_op: bool = False):
    parts = [p.contiguous() for p in x.chunk(dist.get_world_size(group), dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    work = dist.reduce_scatter(out, parts, group=group, async_op=async_op)

    def result() -> torch.Tensor:
        if work is not None:
            work.wait()
        return out

    return result if async_op else result()


def _split_seq(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    # a copy, never a view: a view (micro-batch 1 slices the sequence contiguously) would keep the
    # whole tensor alive for as long as the slice is saved for backward
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].clone(
        memory_format=torch.contiguous_format)


class _EnterRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ExitRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSeq(torch.autograd.Function):
    """All-gather the shards (along ``dim``) for a consumer that every rank runs whole and alike (a
    replicated head and its loss, a pipeline chunk without SP): each rank's gradient of the whole
    is already the whole gradient, so backward keeps this rank's slice of it."""

    @staticmethod
    def forward(ctx, x, group, dim=SEQ_DIM):
        ctx.group, ctx.dim = group, dim
        return _all_gather_seq(x, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return _split_seq(grad, ctx.group, ctx.dim), None, None


class _GatheredLinears(torch.autograd.Function):
    """``F.linear(gathered x, W_i, b_i)`` for every pair ``weights = (W_1, b_1, W_2, b_2, ...)`` (a
    bias may be None), keeping only x, this rank's shard of the sequence, for backward: Megatron-Core's
    ``LinearWithGradAccumulationAndAsyncCommunication`` with SP, for several linears at once. The
    input's gradient is a partial sum over the ranks (each holds a slice of every W_i), reduced and
    scattered back to the shards."""

    @staticmethod
    def forward(ctx, x, group, *weights):
        ctx.group = group
        ctx.save_for_backward(x, *weights)
        full = _all_gather_seq(x, group)
        return tuple(F.linear(full, w, b) for w, b in zip(weights[::2], weights[1::2]))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        pending_full = _all_gather_seq(x, ctx.group, async_op=True)
        grad_full = sum(g @ w for g, w in zip(grads, weights[::2]))
        full = pending_full().flatten(0, -2)
        pending_grad_x = _reduce_scatter_seq(grad_full, ctx.group, async_op=True)
        grad_weights = []
        for i, g in enumerate(grads):
            g = g.flatten(0, -2)
            needs_weight, needs_bias = ctx.needs_input_grad[2 + 2 * i: 4 + 2 * i]
            grad_weights += [g.t() @ full if needs_weight else None, g.sum(0) if needs_bias else None]
        return pending_grad_x(), None, *grad_weights


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """This rank's slice (along ``dim``) of a tensor every rank holds whole; backward gathers the
    slices' gradients to the whole gradient."""

    @staticmethod
    def forward(ctx, x, group, dim=SEQ_DIM):
        ctx.group, ctx.dim = group, dim
        return _split_seq(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group, dim=ctx.dim), None, None


@dataclass(frozen=True)
class TPContext:
    """What a layer needs to know about tensor parallelism."""

    mesh: Mesh
    sequence_parallel: bool = False

    @property
    def size(self) -> int:
        return self.mesh.tp

    @property
    def rank(self) -> int:
        return self.mesh.tp_rank

    def column_parallel(self, x: torch.Tensor, *linears: tuple) -> tuple[torch.Tensor, ...]:
        """Into a parallel region through the linears that read its input ``x`` (with SP this rank's
        sequence shard): ``product(x, W, b)`` of the full sequence for each ``(W, b[, product])``
        (``F.linear`` unless given: FP8 layers give theirs). With SP the sequence is gathered once for
        all of them and only the shard is kept for backward."""
        linears = [(w, b, *rest, F.linear)[:3] for w, b, *rest in linears]
        if self.size > 1 and self.sequence_parallel:
            if any(product is not F.linear for _, _, product in linears):
                # (an FP8 _GatheredLinears would need its own backward: config.validate_fp8 refuses the pair)
                raise RuntimeError("column_parallel: sequence parallelism runs its linears in the model's precision")
            return _GatheredLinears.apply(x, self.mesh.tp_group, *(t for w, b, _ in linears for t in (w, b)))
        if self.size > 1:
            x = _EnterRegion.apply(x, self.mesh.tp_group)
        return tuple(product(x, w, b) for w, b, product in linears)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """Out of a parallel region: sum the ranks' partial outputs (scattered along the sequence with SP)."""
        if self.size == 1:
            return x
        if self.sequence_parallel:
            return _ReduceScatterSeq.apply(x, self.mesh.tp_group)
        return _ExitRegion.apply(x, self.mesh.tp_group)

    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce partial results to the full activation, with or without SP."""
        if self.size == 1:
            return x
        return _ExitRegion.apply(x, self.mesh.tp_group)

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Full sequence -> this rank's shard (SP only)."""
        if self.size == 1 or not self.sequence_parallel:
            return x
        return _ScatterSeq.apply(x, self.mesh.tp_group)

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's sequence shard -> the full sequence, for a replicated layer after the last
        block (SP only; without SP every rank holds the full sequence already)."""
        if self.size == 1 or not self.sequence_parallel:
            return x
        return _GatherSeq.apply(x, self.mesh.tp_group)

    def split_message(self, x: torch.Tensor) -> torch.Tensor:
        """A pipeline chunk's output, before it is sent: without SP every tensor rank holds the whole
        activation, so each sends only its 1/tp of the hidden dim and the receiving chunk gathers
        them (Megatron-LM's scatter-gather: a message of s·b·h/tp, as with SP, whose activations are
        sequence shards already)."""
        if self.size == 1 or self.sequence_parallel:
            return x
        return _ScatterSeq.apply(x, self.mesh.tp_group, -1)

    def join_message(self, x: torch.Tensor) -> torch.Tensor:
        """A received pipeline message back to the whole activation (see :meth:`split_message`)."""
        if self.size == 1 or self.sequence_parallel:
            return x
        return _GatherSeq.apply(x, self.mesh.tp_group, -1)

    def replicated(self, p: torch.Tensor) -> torch.Tensor:
        """Use a replicated parameter on sequence shards: its gradient is summed over the group."""
        if self.size == 1 or not self.sequence_parallel:
            return p
        return _EnterRegion.apply(p, self.mesh.tp_group)

    def shared_weight(self, p: torch.Tensor) -> torch.Tensor:
        """Use a replicated parameter inside a parallel region (each rank contributes part of its gradient)."""
        if self.size == 1:
            return p
        return _EnterRegion.apply(p, self.mesh.tp_group)


# ------------------------------------------------------------------------- initialization


def _generator(seed: int, layer_id: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{layer_id}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def init_layer(layer: nn.Module, layer_id: int, seed: int, tp: TPContext) -> None:
    """Initialize every parameter of one layer from its full shape, then keep this rank's shard.

    A parameter's ``init_std`` attribute says how it starts (None: ones for norm weights, zeros
    for biases); ``shard`` (a :class:`Shard`) says how it is split over tensor-parallel ranks.
    """
    with torch.no_grad():
        for name, p in layer.named_parameters():
            std = getattr(p, "init_std", None)
            shard: Shard | None = getattr(p, "shard", None)
            full_shape = shard.full_shape(p.shape, tp.size) if shard else p.shape
            if std is None:
                full = torch.ones(full_shape) if name.endswith("weight") else torch.zeros(full_shape)
            else:
                full = torch.empty(full_shape).normal_(0.0, std, generator=_generator(seed, layer_id, name))
            p.copy_(shard.take(full, tp.rank, tp.size) if shard else full)


@dataclass(frozen=True)
class Shard:
    """How a parameter splits over tensor-parallel ranks: along ``dim``, each of ``parts`` (sizes
    along that dim of the logical pieces fused in one matrix, e.g. gate and value of SwiGLU) split
    evenly, a rank's shard being its slice of every part, concatenated."""

    dim: int
    parts: tuple[int, ...]

    def full_shape(self, local_shape: torch.Size, tp: int) -> torch.Size:
        shape = list(local_shape)
        shape[self.dim] = sum(self.parts)
        return torch.Size(shape)

    def take(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's shard of the full tensor."""
        pieces = full.split(list(self.parts), dim=self.dim)
        return torch.cat([p.chunk(tp, dim=self.dim)[rank] for p in pieces], dim=self.dim)

    def join(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard, in rank order (the inverse of ``take``)."""
        tp = len(shards)
        per_rank = [s.split([n // tp for n in self.parts], dim=self.dim) for s in shards]
        return torch.cat([torch.cat([parts[i] for parts in per_rank], dim=self.dim)
                          for i in range(len(self.parts))], dim=self.dim)


def sharded_parameter(full_shape: tuple[int, ...], shard: Shard, tp: int, init_std: float | None) -> nn.Parameter:
    local = list(full_shape)
    local[shard.dim] //= tp
    p = nn.Parameter(torch.empty(local))
    p.shard, p.init_std = shard, init_std
    # DeepSpeed counts these once per shard (not once per tensor-parallel rank) in gradient norms
    p.tensor_model_parallel = tp > 1
    p.model_parallel = tp > 1
    p.partition_dim = shard.dim
    return p


def parameter(shape: tuple[int, ...], init_std: float | None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.init_std = init_std
    return p


# ------------------------------------------------------------------------------- layers


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over ranks: each rank computes a slice of y. The
    input is the activation between regions (with SP this rank's sequence shard): the layer enters
    the region (``TPContext.column_parallel``, which also runs several linears on one input)."""

    def __init__(self, in_features: int, out_parts: list[int], bias: bool, tp: TPContext, init_std: float):
        super().__init__()
        for size in out_parts:
            if size % tp.size:
                raise ValueError(f"output size {size} is not divisible by tensor-parallel size {tp.size}")
        self.tp = tp
        shard = Shard(0, tuple(out_parts))
        self.weight = sharded_parameter((sum(out_parts), in_features), shard, tp.size, init_std)
        self.bias = sharded_parameter((sum(out_parts),), shard, tp.size, None) if bias else None
        self.product = F.linear  # x W^T (+ b); megalm/model/fp8.py may give the layer an FP8 one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.column_parallel(x, (self.weight, self.bias, self.product))[0]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over ranks: each rank's output is a partial sum,
    reduced by ``TPContext.exit`` before the (replicated) bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext, init_std: float):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tensor-parallel size {tp.size}")
        self.tp = tp
        self.weight = sharded_parameter((out_features, in_features), Shard(1, (in_features,)), tp.size, init_std)
        self.bias = parameter((out_features,), None) if bias else None
        self.product = F.linear  # x W^T; megalm/model/fp8.py may give the layer an FP8 one

    def forward(self, x: torch.Tensor, product=None) -> torch.Tensor:
        """``product(x, W)``: this rank's partial product (the layer's own, unless attention's output
        projection passes one that also moves its input between context-parallel ranks)."""
        y = self.tp.exit((product or self.product)(x, self.weight))
        return y if self.bias is None else y + self.tp.replicated(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split over ranks; each rank looks up the ids it owns,
    the others contribute zeros, and an all-reduce sums the result."""

    def __init__(self, vocab_size: int, dim: int, tp: TPContext, init_std: float):
        super().__init__()
        if vocab_size % tp.size:
            raise ValueError(f"vocab size {vocab_size} is not divisible by tensor-parallel size {tp.size}")
        self.tp = tp
        self.per_rank = vocab_size // tp.size
        self.start = tp.rank * self.per_rank
        self.weight = sharded_parameter((vocab_size, dim), Shard(0, (vocab_size,)), tp.size, init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.sum_partials(out.masked_fill(outside.unsqueeze(-1), 0.0))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits whose vocabulary is split over ranks, without gathering them."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):  # logits (N, V/tp) float32, targets (N,)
        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - max_logit.unsqueeze(-1)
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(target_logit, group=group)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits[torch.arange(len(local), device=local.device), local] -= mine.to(softmax.dtype)
        return grad_logits * grad.unsqueeze(-1), None, None, None




def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TPContext,
                                 reduction: str = "mean") -> torch.Tensor:
    """Next-token loss, mean or sum over tokens whose label is not IGNORE; logits (..., V/tp) hold
    this rank's slice of the vocabulary."""
    logits, targets = logits.float().flatten(0, -2), targets.flatten()
    if tp.size == 1:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
    start = tp.rank * logits.shape[-1]
    valid = targets != IGNORE
    losses = _VocabParallelCrossEntropy.apply(logits, targets, start, tp.mesh.tp_group) * valid
    return losses.sum() if reduction == "sum" else losses.sum() / valid.sum()


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """The most likely token id over the whole vocabulary from this rank's slice of the logits."""
    best, index = logits.max(dim=-1)
    if tp.size == 1:
        return index
    index = index + tp.rank * logits.shape[-1]
    bests = [torch.empty_like(best) for _ in range(tp.size)]
    indices = [torch.empty_like(index) for _ in range(tp.size)]
    dist.all_gather(bests, best.contiguous(), group=tp.mesh.tp_group)
    dist.all_gather(indices, index.contiguous(), group=tp.mesh.tp_group)
    winner = torch.stack(bests).argmax(dim=0, keepdim=True)  # the first rank wins ties, as one argmax would
    return torch.stack(indices).gather(0, winner).squeeze(0)


def gather_vocab(logits: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Full logits from vocabulary shards (evaluation and sampling; not differentiable)."""
    if tp.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    dist.all_gather(parts, logits.contiguous(), group=tp.mesh.tp_group)
    return torch.cat(parts, dim=-1)


def residual_std(base_std: float, n_layers: int) -> float:
    """GPT-2's depth scaling of the projections that write into the residual stream."""
    return base_std / math.sqrt(2 * n_layers)

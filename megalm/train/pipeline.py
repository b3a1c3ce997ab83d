"""Pipeline-parallel steps: this rank's chunks run by a ``torch.distributed.pipelining`` schedule,
the optimizer by the DeepSpeed engine.

DeepSpeed's own pipeline engine knows one schedule (1F1B) and one chunk per rank; torch's
pipelining has 1F1B, interleaved 1F1B and the zero-bubble schedules, which split each backward into
its input-gradient and weight-gradient halves (docs/design.md, "Pipeline schedules"). So the
schedule is torch's and the rest stays DeepSpeed's, as in its pipeline engine: the engine wraps
``PipelineModel`` (ZeRO 1 shards its optimizer over data-parallel ranks, bf16, clipping, the step
guard), and after the schedule has run every micro-batch's forward and backward the trainer asks it
to reduce the gradients over data-parallel ranks and step.

Memory: a stage holds only what its schedule still needs, as Megatron-LM's does (``LeanStage``).

Gradients: the loss functions' scaled sums (see ``LossFunction``) divided by the micro-batch count
(here, in the loss: the schedule's own ``scale_grads`` would divide a weight that two chunks of a
rank share twice), averaged over data-parallel ranks by the engine: the exact mean over the global
batch, as on every other layout. A tied head's copy of the embedding matrix and the
original get the sum of both gradients before the step.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.distributed as dist

from megalm.model.pipeline import PipelineModel
from megalm.parallel.mesh import Mesh

log = logging.getLogger("megalm")


def schedule_class(name: str):
    """torch's schedule for ``parallel.pp_schedule`` (imported here: torch.distributed.pipelining costs
    ~1.3 s to import, which commands that never pipeline, e.g. megalm generate, should not pay)."""
    from torch.distributed.pipelining import (
        Schedule1F1B, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    return {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zb": ScheduleInterleavedZeroBubble,
            "zbv": ScheduleZBVZeroBubble}[name]


def _allocate(infos, device: torch.device) -> None:
    """Receive buffers of a micro-batch (``_RecvInfo``s holding a storage-less meta tensor) made real."""
    for info in infos:
        if info.buffer is not None and info.buffer.is_meta:
            info.buffer = torch.empty(info.buffer.shape, dtype=info.buffer.dtype, device=device
                                      ).requires_grad_(info.buffer.requires_grad)


def _drop(infos) -> None:
    """Receive buffers let go of (the micro-batch's autograd graph keeps what its backward still reads),
    their shape and dtype remembered in a meta tensor."""
    for info in infos:
        if info.buffer is not None and not info.buffer.is_meta:
            info.buffer = torch.empty(info.buffer.shape, dtype=info.buffer.dtype, device="meta"
                                      ).requires_grad_(info.buffer.requires_grad)


def _free_storage(output: torch.Tensor) -> None:
    """A sent output keeps its autograd node and shape (backward needs no more) but no storage: the
    send holds the data until it completes (Megatron-LM's ``deallocate_output_tensor``). Not for a view,
    nor an output its own backward reads."""
    if output._base is None and getattr(output.grad_fn, "_saved_result", None) is None:
        output.data = torch.empty((), dtype=output.dtype, device=output.device).expand(output.shape)


def _let_go_of_graph(loss: torch.Tensor | None) -> None:
    """A micro-batch's loss, once its backward has run, detached: the schedule keeps every loss of the
    step (to report them), and a loss's autograd graph reaches the stage's received input (its gradient
    accumulator holds it) and that input's gradient: two messages a micro-batch, all step long."""
    if isinstance(loss, torch.Tensor) and not loss._is_view():
        loss.detach_()


def lean_stage_class():
    """``LeanStage``, made here (torch.distributed.pipelining's import is deferred: see
    ``schedule_class``)."""
    from torch.distributed.pipelining import PipelineStage

    class LeanStage(PipelineStage):
        """torch's pipeline stage, holding what Megatron-LM's holds. torch keeps a receive buffer
        for every micro-batch of the step, activation and gradient, for the whole run, and a chunk's
        output until its micro-batch's backward; this one makes a receive buffer when its receive is
        posted and lets go of it after the micro-batch's backward, and frees an output's storage once
        its send is posted (what a send holds is then freed when the schedule has waited for it:
        1F1B waits before its next send, the other schedules at the end of the step), and a
        micro-batch's autograd graph once its backward has run."""

        deferred_losses: dict[int, torch.Tensor] = {}

        def _prepare_forward_infra(self, *args, **kwargs):
            meta = super()._prepare_forward_infra(*args, **kwargs)
            for infos in self.args_recv_info.values():
                _drop(infos)
            return meta

        def _prepare_backward_infra(self, *args, **kwargs):
            meta = super()._prepare_backward_infra(*args, **kwargs)
            for infos in self.grad_recv_info.values():
                _drop(infos)
            return meta

        def get_fwd_recv_ops(self, fwd_chunk_id: int):
            _allocate(self.args_recv_info[fwd_chunk_id], self.device)
            return super().get_fwd_recv_ops(fwd_chunk_id)

        def get_bwd_recv_ops(self, bwd_chunk_id: int):
            _allocate(self.grad_recv_info.get(bwd_chunk_id, ()), self.device)
            return super().get_bwd_recv_ops(bwd_chunk_id)

        def get_fwd_send_ops(self, fwd_chunk_id: int):
            ops = super().get_fwd_send_ops(fwd_chunk_id)  # (each op sends a detached tensor of its own)
            if not self.is_last:  # (the last stage's output is its loss's input: it is asked, and sends nothing)
                for output in self.fwd_cache[fwd_chunk_id][0]:
                    _free_storage(output)
            return ops

        def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True,
                               last_backward: bool = False):
            super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                       last_backward=last_backward)
            if full_backward:
                _let_go_of_graph(loss)
            else:  # (a zero-bubble schedule's weight pass still walks the graph)
                self.deferred_losses[bwd_chunk_id] = loss
            _drop(self.args_recv_info.get(bwd_chunk_id, ()))
            _drop(self.grad_recv_info.get(bwd_chunk_id, ()))

        def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
            super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)
            _let_go_of_graph(self.deferred_losses.pop(bwd_chunk_id, None))

    return LeanStage


class Schedule:
    """A schedule of torch's over this rank's chunks (``LeanStage``s), which keeps no outputs: the
    last stage's outputs are its losses' inputs (logits, vocabulary-sized), which torch otherwise keeps
    for every micro-batch of the step to return them."""

    def __init__(self, name: str, chunks: list[torch.nn.Module], indices: list[int], n_chunks: int,
                 micro_batches: int, device: torch.device, group, loss_fn):
        LeanStage = lean_stage_class()
        self.stages = [LeanStage(chunk, index, n_chunks, device, group=group) for index, chunk in zip(indices, chunks)]
        self.torch_schedule = schedule_class(name)(self.stages[0] if name == "1f1b" else self.stages, micro_batches,
                                                   loss_fn=loss_fn, scale_grads=False)
        self.keep_outputs = {"return_outputs": False}
        if "return_outputs" not in inspect.signature(self.torch_schedule.step).parameters:
            self.keep_outputs = {}
            log.warning("pipeline: torch %s's schedules keep every micro-batch's logits until the step ends (no "
                        "return_outputs in its step())", torch.__version__)

    def step(self, *args, **kwargs) -> None:
        self.torch_schedule.step(*args, **self.keep_outputs, **kwargs)


class Pipeline:
    """Runs a training step's micro-batches through this rank's chunks of ``model`` by its schedule
    (collective over the pipeline group)."""

    def __init__(self, model: PipelineModel, mesh: Mesh, micro_batches: int, device: torch.device):
        self.model, self.mesh, self.device = model, mesh, device
        self.schedule = Schedule(model.schedule, list(model.chunks), model.indices, model.n_chunks, micro_batches,
                                 device, mesh.pp_group, self._loss)
        self.micro_batches = micro_batches
        self.holds_first = 0 in model.indices
        self.holds_last = model.n_chunks - 1 in model.indices
        self.last_global = mesh.global_rank(model.owners[-1], mesh.dp_rank, mesh.tp_rank)
        self.tied_group = self._tied_group()
        self._scale = None

    def _tied_group(self):
        """The two ranks of each pipeline (the first chunk's and the last's) that hold a tied
        embedding matrix each, when they are two (collective: every rank makes every group)."""
        m = self.mesh
        first, last = self.model.owners[0], self.model.owners[-1]
        if first == last or not self._tied_anywhere():
            return None
        mine = None
        for d in range(m.dp):
            for t in range(m.tp):
                group = dist.new_group([m.global_rank(first, d, t), m.global_rank(last, d, t)])
                if d == m.dp_rank and t == m.tp_rank and m.pp_rank in (first, last):
                    mine = group
        return mine

    def _tied_anywhere(self) -> bool:
        flag = torch.tensor([len(self.model.tied_copies())], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag)  # (only the last chunk's rank knows; every rank must agree to make the groups)
        return bool(flag.item())

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss_fn(output, (labels, self._scale / self.micro_batches))

    def train_batch(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch (inputs, labels), then the tied gradients
        summed; returns the mean of the micro-batches' (scaled) losses, on every rank of the
        pipeline. The engine's reduction and step are the caller's."""
        self._scale = scale
        losses: list[torch.Tensor] = []
        args = (torch.cat([x for x, _ in micro_batches]).to(self.device),) if self.holds_first else ()
        kwargs = {"target": torch.cat([y for _, y in micro_batches]).to(self.device), "losses": losses} \
            if self.holds_last else {}
        self.schedule.step(*args, **kwargs)
        if self.tied_group is not None:
            for p in self._tied_weights():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.tied_group)
        loss = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.last_global, group=self.mesh.pp_group)
        return loss

    def _tied_weights(self) -> list[torch.nn.Parameter]:
        if self.holds_first:
            return [chunk.embed.tok.weight for chunk in self.model.chunks if chunk.embed is not None]
        return self.model.tied_copies()


@torch.no_grad()
def pipeline_forward(model: PipelineModel, mesh: Mesh, batches, device: torch.device) -> torch.Tensor:
    """Collective over the pipeline group: the summed loss of ``batches`` of (inputs, target)
    through the chunks, without gradients, on every rank of the pipeline. Chunk by chunk in
    pipeline order, each passing its micro-batches' outputs on as it makes them; a message is the
    output's shape, then the output (a classifier's micro-batches are as long as their longest text)."""
    batches = list(batches)
    total = torch.zeros((), dtype=torch.float64, device=device)
    pending, handed = [], []  # sends in flight; outputs for the next chunk when this rank holds it too
    ranks = [mesh.global_rank(r, mesh.dp_rank, mesh.tp_rank) for r in model.owners]
    dtype = next(model.parameters()).dtype
    for index, chunk in sorted(zip(model.indices, model.chunks), key=lambda pair: pair[0]):
        here, handed = handed, []
        for k, (inputs, target) in enumerate(batches):
            if index == 0:
                x = inputs.to(device)
            elif ranks[index - 1] == ranks[index]:
                x = here[k]
            else:
                shape = torch.zeros(4, dtype=torch.int64, device=device)  # (on the device: NCCL sends only there)
                dist.recv(shape, src=ranks[index - 1], group=mesh.pp_group)
                x = torch.empty([s for s in shape.tolist() if s > 0], dtype=dtype, device=device)
                dist.recv(x, src=ranks[index - 1], group=mesh.pp_group)
            out = chunk(x)
            if index == model.n_chunks - 1:
                total += model.loss_fn(out, target).double()
            elif ranks[index + 1] == ranks[index]:
                handed.append(out)
            else:
                shape = torch.tensor([*out.shape] + [0] * (4 - out.dim()), dtype=torch.int64, device=device)
                pending += [dist.isend(shape, dst=ranks[index + 1], group=mesh.pp_group),
                            dist.isend(out.contiguous(), dst=ranks[index + 1], group=mesh.pp_group)]
    for work in pending:
        work.wait()
    dist.broadcast(total, src=ranks[-1], group=mesh.pp_group)
    return total

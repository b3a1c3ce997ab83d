"""Pipeline-parallel steps: this rank's chunks run by a ``torch.distributed.pipelining`` schedule,
the optimizer by the DeepSpeed engine.

DeepSpeed's own pipeline engine knows one schedule (1F1B) and one chunk per rank; torch's
pipelining has 1F1B, interleaved 1F1B and the zero-bubble schedules, which split each backward into
its input-gradient and weight-gradient halves (docs/design.md, "Pipeline schedules"). So the
schedule is torch's and the rest stays DeepSpeed's, as in its pipeline engine: the engine wraps
``PipelineModel`` (ZeRO 1 shards its optimizer over data-parallel ranks, bf16, clipping, the step
guard), and after the schedule has run every micro-batch's forward and backward the trainer asks it
to reduce the gradients over data-parallel ranks and step.

Gradients: the loss functions' scaled sums (see ``LossFunction``) divided by the micro-batch count
(here, in the loss: the schedule's own ``scale_grads`` would divide a weight that two chunks of a
rank share twice), averaged over data-parallel ranks by the engine: the exact mean over the global
batch, as on every other layout. A tied head's copy of the embedding matrix and the
original get the sum of both gradients before the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.model.pipeline import PipelineModel
from megalm.parallel.mesh import Mesh


def schedule_class(name: str):
    """torch's schedule for ``parallel.pp_schedule`` (imported here: torch.distributed.pipelining costs
    ~1.3 s to import, which commands that never pipeline, e.g. megalm generate, should not pay)."""
    from torch.distributed.pipelining import (
        Schedule1F1B, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    return {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zb": ScheduleInterleavedZeroBubble,
            "zbv": ScheduleZBVZeroBubble}[name]


class Pipeline:
    """Runs a training step's micro-batches through this rank's chunks of ``model`` by its schedule
    (collective over the pipeline group)."""

    def __init__(self, model: PipelineModel, mesh: Mesh, micro_batches: int, device: torch.device):
        from torch.distributed.pipelining import PipelineStage

        self.model, self.mesh, self.device = model, mesh, device
        self.stages = [PipelineStage(chunk, index, model.n_chunks, device, group=mesh.pp_group)
                       for index, chunk in zip(model.indices, model.chunks)]
        cls = schedule_class(model.schedule)
        self.schedule = cls(self.stages[0] if model.schedule == "1f1b" else self.stages, micro_batches,
                            loss_fn=self._loss, scale_grads=False)
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

"""The 3D process mesh: which global rank holds which (pipeline, data, tensor) coordinate.

Ranks are laid out tensor-parallel fastest, then data-parallel, then pipeline:
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. So a tensor-parallel group is a run of
consecutive ranks (inside one node, where its per-layer collectives are cheap), and the pipeline
stages are the slowest axis (across nodes). This is also DeepSpeed's
``PipeModelDataParallelTopology`` order, so its pipeline engine and ZeRO agree with ours.

With context parallelism (``cp`` > 1, megalm/parallel/context_parallel.py) each data-parallel rank
splits into ``cp`` consecutive ones that share its sequences, a part each: they hold the same weights,
so they are among the ``dp`` replicas here (``dp`` counts them all: gradients averaged and ZeRO
sharded over all), and ``data_rank`` / ``data_parallel`` say which sequences a rank reads.

The mesh doubles as the ``mpu`` DeepSpeed asks for: ZeRO then shards over the data-parallel group
only, and gradient norms are summed over the model-parallel group (the tensor and pipeline ranks of
one replica), counting a replicated weight on tensor rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megalm.parallel.collectives import RECORDER


@dataclass
class Mesh:
    tp: int
    pp: int
    dp: int
    rank: int
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    model_group: dist.ProcessGroup | None = None  # tp x pp: the ranks of one model replica
    cp: int = 1  # consecutive replicas that share a sequence, a part each (context parallelism)
    cp_group: dist.ProcessGroup | None = None

    @property
    def cp_rank(self) -> int:
        return self.dp_rank % self.cp

    @property
    def data_rank(self) -> int:
        """Which sequences this rank reads: the data-parallel rank, context-parallel ranks counted once."""
        return self.dp_rank // self.cp

    @property
    def data_parallel(self) -> int:
        return self.dp // self.cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def global_rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def describe(self) -> str:
        """One line per global rank: its (pp, dp, tp) coordinate."""
        cp = f" x cp={self.cp}" if self.cp > 1 else ""
        lines = [f"layout: tp={self.tp}{cp} x dp={self.data_parallel} x pp={self.pp} = {self.tp * self.dp * self.pp} "
                 f"processes"]
        for p in range(self.pp):
            for d in range(self.dp):
                ranks = [self.global_rank(p, d, t) for t in range(self.tp)]
                part = f", sequence part {d % self.cp}" if self.cp > 1 else ""
                lines.append(f"  pipeline stage {p}, data rank {d // self.cp}{part}: global ranks {ranks} "
                             f"(tensor ranks 0..{self.tp - 1})")
        return "\n".join(lines)

    # ---- the model-parallel-unit interface DeepSpeed calls
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_model_parallel_group(self):
        return self.model_group

    # newer DeepSpeed code asks with the Megatron-Core names
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group


def single_process_mesh() -> Mesh:
    """tp = pp = dp = 1 without any process group: for building models outside training."""
    return Mesh(tp=1, pp=1, dp=1, rank=0)


def build_mesh(tp: int, pp: int, world_size: int, rank: int, cp: int = 1) -> Mesh:
    """Create every tensor-, context-, data- and pipeline-parallel group (collective: all ranks call it).
    ``dp`` counts the context-parallel ranks too (see the module's docstring)."""
    dp = world_size // (tp * pp)
    mesh = Mesh(tp=tp, pp=pp, dp=dp, rank=rank, cp=cp)
    # new_group must be called by every rank for every group, in the same order
    for p in range(pp):
        for d in range(dp):
            group = _new_group("tp", [mesh.global_rank(p, d, t) for t in range(tp)])
            if mesh.pp_rank == p and mesh.dp_rank == d:
                mesh.tp_group = group
    for p in range(pp):
        for t in range(tp):
            group = _new_group("dp", [mesh.global_rank(p, d, t) for d in range(dp)])
            if mesh.pp_rank == p and mesh.tp_rank == t:
                mesh.dp_group = group
    for d in range(dp):
        for t in range(tp):
            group = _new_group("pp", [mesh.global_rank(p, d, t) for p in range(pp)])
            if mesh.dp_rank == d and mesh.tp_rank == t:
                mesh.pp_group = group
    if cp > 1:
        for p in range(pp):
            for data in range(dp // cp):
                for t in range(tp):
                    group = _new_group("cp", [mesh.global_rank(p, data * cp + c, t) for c in range(cp)])
                    if mesh.pp_rank == p and mesh.data_rank == data and mesh.tp_rank == t:
                        mesh.cp_group = group
    mesh.model_group = mesh.tp_group
    if pp > 1:
        for d in range(dp):
            group = _new_group("model", [mesh.global_rank(p, d, t) for p in range(pp) for t in range(tp)])
            if mesh.dp_rank == d:
                mesh.model_group = group
    return mesh


def _new_group(kind: str, ranks: list[int]) -> dist.ProcessGroup:
    """A process group, named for the collectives' record (e.g. ``dp 0,2``)."""
    group = dist.new_group(ranks)
    RECORDER.name_group(group, f"{kind} {','.join(map(str, ranks))}")
    return group

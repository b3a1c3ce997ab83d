"""The model and optimizer state a rank holds, as fragments of the one-process model's parameters.

Whatever the layout, every parameter of the one-process model (``blocks.0.attn.q.weight``) has an
fp32 master value and two Adam moments. A rank holds a *fragment* of each: of its tensor-parallel
shard (``Shard`` in tensor_parallel.py; the whole tensor if the parameter is replicated), flattened,
the range ``[start, start + numel)`` that its ZeRO partition owns (all of it without ZeRO). A
fragment is named by the one-process parameter name, so a checkpoint of fragments can be put back
on any (tp, pp, dp, ZeRO stage): each rank assembles what it needs from whichever ranks wrote it.

DeepSpeed keeps the masters and moments in one of four places, and ``Slot`` hides which:

- ``fragment``: ZeRO 1/2 and DeepSpeed's BF16 optimizer link each parameter to its slice of a flat
  fp32 partition (``param._hp_mapping``, DeepSpeed's tensor-fragment API);
- ``zero3``: ZeRO 3 partitions each parameter on its own (``safe_get_local_fp32_param``);
- ``unfused``: bf16 without ZeRO keeps an fp32 copy per parameter (``optimizer.fp32_groups``);
- ``plain``: fp32 without ZeRO: the parameter is the master, the torch optimizer holds its state.

The model's own (bf16 or fp32) weights are refreshed from the masters when a checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megalm.parallel.mesh import Mesh

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's state, besides "step"


@dataclass(frozen=True)
class Fragment:
    """One rank's part of one parameter (an entry of a rank's checkpoint index)."""

    name: str  # the parameter's name in the one-process model
    tp_rank: int
    tp: int  # tensor-parallel size of the layout that wrote it
    shard_dim: int  # dimension split over tensor-parallel ranks; -1: replicated (every rank holds it whole)
    shard_parts: tuple[int, ...]  # sizes along shard_dim of the pieces each split evenly (see Shard)
    shape: tuple[int, ...]  # this tensor-parallel shard's shape
    start: int  # first element of the flattened shard this fragment holds
    numel: int
    offset: int = 0  # where its values start in the rank's data file (master, then each moment)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


class Slot:
    """Where one local parameter's fragment lives in the engine: read it, or write it back."""

    def __init__(self, engine, p: nn.Parameter, fragment: Fragment):
        self.engine, self.p, self.fragment = engine, p, fragment
        if hasattr(p, "ds_id"):
            self.kind = "zero3"
        elif hasattr(p, "_hp_mapping"):
            self.kind = "fragment"
        elif hasattr(engine.optimizer, "fp32_groups") and hasattr(engine.optimizer, "fp16_groups"):
            self.kind = "unfused"
            self.master = _fp32_copy(engine.optimizer, p)
        else:
            self.kind = "plain"
            self.master = p

    def read(self) -> list[torch.Tensor]:
        """The master fragment and each moment (zeros before the optimizer's first step)."""
        p, n = self.p, self.fragment.numel
        if self.kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            master = safe_get_local_fp32_param(p)[:n]
            moments = [safe_get_local_optimizer_state(p, k)[:n] if self._has_state() else torch.zeros_like(master)
                       for k in MOMENTS]
            return [master, *moments]
        if self.kind == "fragment":
            master = p._hp_mapping.hp_fragment.view(-1)
            return [master, *(self._moment(k) if self._has_state() else torch.zeros_like(master) for k in MOMENTS)]
        state = base_optimizer(self.engine).state.get(self.master, {})
        master = self.master.detach().view(-1)
        return [master, *(state[k].view(-1) if k in state else torch.zeros_like(master) for k in MOMENTS)]

    def _has_state(self) -> bool:
        return any(len(s) for s in base_optimizer(self.engine).state.values())

    def _moment(self, key: str) -> torch.Tensor:
        """A ZeRO 1/2 (or BF16 optimizer) fragment's slice of a moment. Read from the optimizer's
        state of the flat partition, not from ``_hp_mapping.optim_fragment``: DeepSpeed 0.19 links
        the latter after stepping the first parameter group only, so later groups (e.g. the norms
        and biases) never get theirs."""
        mapping = self.p._hp_mapping
        opt = base_optimizer(self.engine)
        flat = opt.param_groups[mapping.param_group_index]["params"][0]
        address = mapping.hp_fragment_address
        return opt.state[flat][key].narrow(0, address.start, address.numel)

    @torch.no_grad()
    def write(self, local: torch.Tensor, moments: list[torch.Tensor]) -> None:
        """Set the master and moments of this fragment from the full local shard ``local`` and the
        moments' full local shards; refresh the model's own weights. Optimizer state must exist
        (see ``ensure_optimizer_state``)."""
        p, f = self.p, self.fragment
        piece = slice(f.start, f.start + f.numel)
        if self.kind == "zero3":
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            size = p.ds_tensor.numel()  # the partition, padded past the end of the parameter (f.numel may be 0)
            padded = [torch.zeros(size, dtype=torch.float32) for _ in range(3)]
            for buf, full in zip(padded, [local, *moments]):
                buf[:f.numel] = full.reshape(-1)[piece]
            safe_set_local_fp32_param(p, padded[0].to(p.ds_tensor.device))
            for key, buf in zip(MOMENTS, padded[1:]):
                safe_set_local_optimizer_state(p, buf.to(p.ds_tensor.device), key)
            p.ds_tensor.data.copy_(padded[0].to(p.ds_tensor.dtype))
            return
        p.data.copy_(local.view(p.shape).to(p.dtype))
        if self.kind == "fragment":
            mapping = p._hp_mapping
            if mapping is None:
                return  # another data-parallel rank's partition holds its master and moments
            mapping.hp_fragment.data.view(-1).copy_(local.reshape(-1)[piece])
            for key, full in zip(MOMENTS, moments):
                self._moment(key).copy_(full.reshape(-1)[piece])
            return
        self.master.data.copy_(local.view(p.shape))
        state = base_optimizer(self.engine).state[self.master]
        for key, full in zip(MOMENTS, moments):
            state[key].copy_(full.view(p.shape))


def _fp32_copy(optimizer, p: nn.Parameter) -> torch.Tensor:
    for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp
    raise RuntimeError("parameter without an fp32 master copy in DeepSpeed's bf16 optimizer")


def local_slots(engine, mesh: Mesh, names: dict[nn.Parameter, str], *, saving: bool) -> list[Slot]:
    """This rank's parameters, each with the fragment of it that this rank's optimizer owns.

    ``names`` maps each local parameter to its one-process name. Saving, a value held by several
    ranks is written once: tensor-parallel replicas by tensor rank 0, data-parallel replicas (no
    ZeRO) by data rank 0, a tied weight by the pipeline rank holding the embedding, and ranks that own no part of a
    parameter write nothing of it. Loading, every local parameter is set (the model's weights
    whole, the optimizer's fragment where this rank owns one)."""
    slots = []
    for p, name in names.items():
        shard = getattr(p, "shard", None)
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        numel = int(torch.Size(shape).numel())
        replica = (shard is None and mesh.tp_rank != 0) or getattr(p, "pipeline_copy", False)
        if hasattr(p, "ds_id"):  # ZeRO 3: each parameter split evenly (padded) over data-parallel ranks
            size = p.ds_tensor.ds_numel
            start, count = mesh.dp_rank * size, max(0, min(size, numel - mesh.dp_rank * size))
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2: a slice of a flat partition, or none
            address = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
            start, count = (address.start, address.numel) if address else (0, 0)
        else:  # no ZeRO: every data-parallel rank holds all of it
            start, count = 0, numel
            replica = replica or mesh.dp_rank != 0
        if saving and (replica or count == 0):
            continue
        fragment = Fragment(name=name, tp_rank=mesh.tp_rank if shard else 0, tp=mesh.tp if shard else 1,
                            shard_dim=shard.dim if shard else -1, shard_parts=tuple(shard.parts) if shard else (),
                            shape=shape, start=start, numel=count)
        slots.append(Slot(engine, p, fragment))
    return slots


def adam_step(engine) -> int:
    """Optimizer steps Adam has taken (its bias correction depends on it)."""
    steps = [int(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s]
    return max(steps, default=0)


def ensure_optimizer_state(engine, step: int) -> None:
    """Give every tensor the torch optimizer updates its state (zeros; Adam step ``step``), as its
    first step would, so that fragments can be written into it before training starts."""
    opt = base_optimizer(engine)
    existing = [s["step"] for s in opt.state.values() if "step" in s]
    like = existing[0] if existing else torch.tensor(0.0, dtype=torch.float32)
    # ZeRO 3 hands its flat fp32 partitions to the torch optimizer only while stepping
    tensors = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [t for group in opt.param_groups for t in group["params"]]
    for t in tensors:
        state = opt.state[t]
        if not state:
            state.update({k: torch.zeros_like(t, memory_format=torch.preserve_format) for k in MOMENTS})
        state["step"] = torch.full_like(like, float(step))

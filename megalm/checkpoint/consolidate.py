"""One full, unsharded model state from a checkpoint of any layout.

A DeepSpeed checkpoint holds the model the way the run split it: with tensor parallelism one
file per tensor rank (``mp_rank_XX_model_states.pt``), with pipeline parallelism one per layer
and tensor rank (``layer_LL-model_XX-model_states.pt``), and with ZeRO-3 the weights only inside
the optimizer shards. This module reassembles the weights of the one-process ``Transformer``
(fp32), for sampling, evaluation and comparisons across layouts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megalm.checkpoint.meta import CheckpointError, Layout
from megalm.config import ModelConfig
from megalm.model.transformer import Transformer, layer_ids
from megalm.parallel.mesh import Mesh


def full_model_state(ckpt: Path, model_cfg: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    tp, pp, zero_stage = layout.tp, layout.pp, layout.zero_stage
    if tp == 1 and pp == 1:
        if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return _float(_load(ckpt / "mp_rank_00_model_states.pt")["module"])
    if zero_stage == 3:
        raise CheckpointError(f"{ckpt}: consolidating a ZeRO-3 checkpoint with tensor parallelism (tp={tp}) "
                              f"is not supported yet; train with train.zero_stage<=2 to sample from it")
    shards = [_tensor_rank_state(ckpt, model_cfg, r, pp) for r in range(tp)]
    # a model with the run's tensor-parallel split (no process group needed to build it) knows how
    # each parameter was sharded
    layout = Transformer(model_cfg, Mesh(tp=tp, pp=1, dp=1, rank=0))
    full = {}
    for name, p in layout.named_parameters():
        if name not in shards[0]:
            raise CheckpointError(f"{ckpt}: no weights for {name}")
        shard = getattr(p, "shard", None)
        if shard is None:
            full[name] = shards[0][name]
            continue
        per_rank = [s[name].split([n // tp for n in shard.parts], dim=shard.dim) for s in shards]
        full[name] = torch.cat([torch.cat([parts[i] for parts in per_rank], dim=shard.dim)
                                for i in range(len(shard.parts))], dim=shard.dim)
    return full


def _tensor_rank_state(ckpt: Path, cfg: ModelConfig, tp_rank: int, pp: int) -> dict[str, torch.Tensor]:
    if pp == 1:
        return _float(_load(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"])
    state = {}
    for name, layer in layer_ids(cfg).items():  # pipeline layer i holds the module named name
        path = ckpt / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"
        if not path.is_file():
            if name == "head" and cfg.tie_embeddings:
                continue  # the tied head is the embedding, saved with it
            raise CheckpointError(f"{ckpt}: missing {path.name}")
        state.update({f"{name}.{k}": v for k, v in _float(_load(path)).items()})
    return state


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises assorted types for torn or foreign files
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _float(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}

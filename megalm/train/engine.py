"""Building the model on its process mesh and handing it to the DeepSpeed engine.

DeepSpeed owns the optimizer (AdamW), ZeRO sharding over the data-parallel group, bf16, gradient
accumulation and clipping (on its plain fp32 path, the step guard clips: guard.py), with the mesh
as its ``mpu`` so ZeRO shards over data-parallel ranks only. With pp = 1 the model is a
``Transformer``; with pp > 1 it is this rank's chunks of one (``PipelineModel``), whose forward and
backward a torch pipelining schedule runs (train/pipeline.py) before the engine steps.
"""

from __future__ import annotations

import logging

import torch
from megalm_kernels.provenance import device_name
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from megalm.config import Config, batch_layout
from megalm.model import fp8
from megalm.model.layers import Block
from megalm.model.pipeline import PipelineModel
from megalm.model.transformer import Transformer
from megalm.parallel.mesh import Mesh
from megalm.train.guard import guard_plain_optimizer, plain_fp32
from megalm.train.schedule import lr_multiplier

log = logging.getLogger("megalm")


def build_model(cfg: Config, mesh: Mesh, device: torch.device | None = None) -> nn.Module:
    """This rank's model. ``device``: where it trains, whose speed decides which linears run in FP8
    (``train.fp8``; collective then); None builds it as evaluation does, every linear as saved."""
    p = cfg.parallel
    if mesh.pp > 1:
        model = PipelineModel(cfg, mesh, seed=cfg.train.seed)
    else:
        model = Transformer(cfg.model, mesh, seed=cfg.train.seed, sequence_parallel=p.sequence_parallel,
                            checkpointing=p.activation_checkpointing)
    if device is not None and cfg.train.fp8.layers != "off":
        tokens = batch_layout(cfg, mesh.data_parallel).micro_batch_size * cfg.data.seq_len // mesh.cp
        log.info(fp8.convert(model, cfg, tokens, device, device_name(device)))
    if cfg.train.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile block by block: the blocks are where the time goes, and a graph per block
    leaves the embedding, the vocabulary-parallel loss and DeepSpeed's hooks outside the compiler."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    log.info("compile: torch.compile on %d Transformer blocks (compiled at their first call)", len(blocks))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases (1-D) are left alone. Embeddings are matrices."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, mesh: Mesh) -> dict:
    t, batch = cfg.train, batch_layout(cfg, mesh.data_parallel)
    return {
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum,
        # (DeepSpeed's data-parallel ranks: the context-parallel ones too, which read parts of the same sequences)
        "train_batch_size": batch.micro_batch_size * batch.grad_accum * mesh.dp,
        # the plain fp32 path's clipping is done by the step guard, which skips non-finite steps (guard.py)
        "gradient_clipping": 0.0 if plain_fp32(t.zero_stage, t.precision) else t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's FusedAdam is a CUDA op that needs compiling at first use.
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                       "weight_decay": t.weight_decay, "torch_adam": True, "adam_w_mode": True},
        },
        # (a pipeline's backward runs outside the engine, which builds its contiguous gradient
        # buffer in its own backward only)
        "zero_optimization": {"stage": t.zero_stage, "contiguous_gradients": cfg.parallel.pp == 1},
        # with ZeRO 1-2, DeepSpeed skips a bf16 step with a non-finite gradient norm only when asked
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,  # megalm does its own logging
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, mesh: Mesh):
    import deepspeed

    def scheduler(optimizer):  # DeepSpeed calls it with the optimizer it built
        if plain_fp32(cfg.train.zero_stage, cfg.train.precision):
            guard_plain_optimizer(optimizer, model, mesh, cfg.train.grad_clip)
        return LambdaLR(optimizer, lr_multiplier(cfg.train))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, mesh),
        mpu=mesh,
        lr_scheduler=scheduler,
    )
    if mesh.pp > 1:
        engine.set_gradient_accumulation_boundary(True)  # one step() a step: the schedule ran the micro-batches
    log.info("engine: DeepSpeed %s engine, ZeRO stage %d, %s, AdamW (torch)%s", deepspeed.__version__,
             cfg.train.zero_stage, cfg.train.precision, f"; pipeline schedule {cfg.parallel.pp_schedule} (torch "
             f"{torch.__version__.split('+')[0]})" if mesh.pp > 1 else "")
    return engine



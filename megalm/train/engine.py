"""Building the model and handing it to the DeepSpeed engine.

DeepSpeed owns the optimizer (AdamW), ZeRO sharding over the data-parallel ranks, bf16, gradient
accumulation and clipping; megalm gives it the model, the parameter groups and the LR schedule.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from megalm.config import Config, ModelConfig
from megalm.model.transformer import Transformer
from megalm.parallel.distributed import World
from megalm.train.schedule import lr_multiplier

log = logging.getLogger("megalm")


def resolve_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    """Fill the model fields that default to the data's (vocabulary, sequence length)."""
    m = cfg.model
    vocab = m.vocab_size or vocab_size
    if vocab < vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {vocab_size}")
    return cfg.replace("model", vocab_size=vocab, max_seq_len=m.max_seq_len or cfg.data.seq_len).model


def build_model(model_cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_cfg)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases (1-D) are left alone. Embeddings are matrices."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's FusedAdam is a CUDA op that needs compiling at first use.
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                       "weight_decay": t.weight_decay, "torch_adam": True, "adam_w_mode": True},
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # megalm does its own logging
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, world: World, dp_size: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, dp_size),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lr_multiplier(cfg.train)),
    )
    log.info("engine: DeepSpeed %s, ZeRO stage %d, %s, AdamW (torch), %d data-parallel ranks on %s",
             deepspeed.__version__, cfg.train.zero_stage, cfg.train.precision, dp_size, world.device)
    return engine

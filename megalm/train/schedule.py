"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (WSD), or constant.

``lr_multiplier(step)`` is a fraction of the peak ``train.lr`` (what ``LambdaLR`` expects).
"""

from __future__ import annotations

import math

from megalm.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * (cfg.steps - cfg.warmup_steps)))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress


def lr_multiplier(cfg: TrainConfig):
    return lambda step: lr_at(cfg, step) / cfg.lr

"""The classification head: class logits read off one position of the final hidden states.

A classifier is the Transformer with ``model.labels`` set: its last layer is ``ClassifierHead``
instead of the language-model head (``model/transformer.py``), and its loss ``PooledCrossEntropy``.
Texts come right-padded with ``PAD`` (a negative id, never a token). The position read is the last
real token for a causal model (the only one that has seen the whole text) and the first for a
masked one (which sees both ways; its attention skips the padding).

The head computes the logits of every position and the loss picks the one to read: so the head is
an ordinary layer, and it works as the last stage of a pipeline, where the loss function is the only
place that sees the targets. A target row is (label index, position); the class logits are few, so
scoring every position costs little next to the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalm.common import IGNORE, PAD
from megalm.config import ModelConfig
from megalm.parallel.tensor_parallel import TPContext, init_layer, parameter

def read_positions(ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B,) the position of each right-padded row of ``ids`` whose hidden state the head reads."""
    if causal:
        return ((ids != PAD).sum(1) - 1).clamp(min=0)
    return torch.zeros(len(ids), dtype=torch.int64, device=ids.device)


class ClassifierHead(nn.Module):
    """Class logits (B, T, n_labels) of the final hidden states. Replicated on every tensor rank:
    with sequence parallelism it first gathers the sequence (the position to read may be anywhere)."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int):
        super().__init__()
        self.tp = tp
        self.weight = parameter((len(cfg.labels), cfg.d_model), cfg.init_std)
        self.bias = parameter((len(cfg.labels),), None)
        init_layer(self, layer_id, seed, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.tp.gather_sequence(x), self.weight, self.bias)


def pooled(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, n_labels): each row's logits at its position."""
    return logits[torch.arange(len(logits), device=logits.device), positions]


class PooledCrossEntropy:
    """Cross-entropy of the class logits at each row's position (a pipeline's ``loss_fn`` too).

    ``target`` is (B, 2) rows of (label index, position), alone (the mean over rows whose label is
    not IGNORE) or with a scale (their sum times it: see LossFunction). While ``collect`` is a list
    (evaluation sets it), each micro-batch's class log-probabilities are appended to it."""

    def __init__(self):
        self.collect: list[torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, target) -> torch.Tensor:
        rows, scale = target if isinstance(target, (tuple, list)) else (target, None)
        x = pooled(logits, rows[:, 1]).float()
        if self.collect is not None:
            self.collect.append(F.log_softmax(x.detach(), dim=-1))
        if scale is None:
            return F.cross_entropy(x, rows[:, 0], ignore_index=IGNORE)
        return F.cross_entropy(x, rows[:, 0], ignore_index=IGNORE, reduction="sum") * scale

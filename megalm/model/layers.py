"""The layers of the Transformer, each one tensor-parallel and each one a pipeline stage's unit.

The model is the sequence ``Embedding, Block x n_layers, FinalNorm, Head`` (see
``transformer.py``). With tensor parallelism (``TPContext``) attention runs on a slice of the
heads and the MLP on a slice of its hidden dim; with tp = 1 every collective is skipped and these
are ordinary layers. Norms and the attention core go through ``megalm_kernels``, which picks the
implementation (Triton, CUDA, Apex, SDPA or plain torch) from ``model.kernels`` and the device.
"""

from __future__ import annotations

import megalm_kernels
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalm.config import ModelConfig
from megalm.parallel.context_parallel import first_position, output_projection, sequence_to_heads
from megalm.parallel.tensor_parallel import (
    IGNORE, ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding, init_layer, parameter,
    residual_std, vocab_parallel_argmax, vocab_parallel_cross_entropy)


class Norm(nn.Module):
    """LayerNorm (gpt2 style, with bias) or RMSNorm (llama style), on replicated activations."""

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        self.rms = cfg.style == "llama"
        self.eps, self.impl, self.tp = cfg.norm_eps, cfg.kernels.norm, tp
        self.weight = parameter((cfg.d_model,), None)
        self.bias = None if self.rms else parameter((cfg.d_model,), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.tp.replicated(self.weight)
        if self.rms:
            return megalm_kernels.rms_norm(x, weight, self.eps, impl=self.impl)
        return megalm_kernels.layer_norm(x, weight, self.tp.replicated(self.bias), self.eps, impl=self.impl)


class Rotary(nn.Module):
    """Rotary position embedding: rotates channel pairs (i, i + D/2) of q and k by position-dependent
    angles; the half-split pairing is Hugging Face Llama's, so weights convert without permutation."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Not saved in checkpoints: derived from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        t = x.shape[1]
        cos, sin = self.cos[:t, None].to(x.dtype), self.sin[:t, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Self-attention with grouped-query heads, split by heads over tensor-parallel ranks: causal
    for next-token models, bidirectional for masked ones (``model.objective``).

    Query heads are always split. Key/value heads are split too when there are at least as many
    as ranks; otherwise (e.g. multi-query attention) every rank holds all of them, computes them,
    and uses the one its query heads share.
    """

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        bias = cfg.style == "gpt2"
        self.tp, self.impl, self.head_dim = tp, cfg.kernels.attention, cfg.head_dim
        self.causal = cfg.objective == "causal"
        self.local_heads = cfg.n_heads // tp.size
        self.split_kv = cfg.kv_heads % tp.size == 0
        kv_width = cfg.kv_heads * cfg.head_dim
        self.q = ColumnParallelLinear(cfg.d_model, [cfg.n_heads * cfg.head_dim], bias, tp, cfg.init_std)
        if self.split_kv:
            self.kv = ColumnParallelLinear(cfg.d_model, [kv_width, kv_width], bias, tp, cfg.init_std)
        else:
            self.kv = nn.Linear(cfg.d_model, 2 * kv_width, bias=bias)
            self.kv.weight.init_std = cfg.init_std
            if bias:
                self.kv.bias.init_std = None
            # the kv head shared by this rank's query heads
            self.kv_head = tp.rank * self.local_heads // (cfg.n_heads // cfg.kv_heads)
        self.out = RowParallelLinear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias, tp,
                                     residual_std(cfg.init_std, cfg.n_layers))
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.style == "llama" else None
        self.selective_checkpoint = False  # set by the model: recompute the attention core in backward
        self.dropout = nn.Dropout(cfg.dropout)

    def _kv_linear(self) -> tuple:
        """The key/value projection's weight, bias and product; replicated ones are shared by the region
        (and multiplied in the model's precision: FP8 converts the split ones only)."""
        if self.split_kv:
            return self.kv.weight, self.kv.bias, self.kv.product
        bias = None if self.kv.bias is None else self.tp.shared_weight(self.kv.bias)
        return self.tp.shared_weight(self.kv.weight), bias, F.linear

    def _keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, T, heads, D) of the key/value projection's output."""
        b, t, _ = kv.shape
        k, v = (part.view(b, t, -1, self.head_dim) for part in kv.chunk(2, dim=-1))
        if not self.split_kv:  # a copy of the head this rank uses: a view would keep all of them for backward
            one = slice(self.kv_head, self.kv_head + 1)
            k, v = k[:, :, one].contiguous(), v[:, :, one].contiguous()
        return k, v

    def _core(self, q, k, v, padding=None):
        """Attention over q, k, v (B, T, heads, D). The output (B, heads, T, D) is laid out in memory as
        q, (B, T, heads, D), so the output projection's input is a view of it: one tensor kept for backward."""
        if self.rotary is not None:
            # v is a view of the key/value projection: kept for backward, it would keep the unrotated keys too
            q, k, v = self.rotary(q), self.rotary(k), v.contiguous()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if padding is not None and not self.causal:
            # Bidirectional attention over right-padded rows must not look at the padding; the fused
            # kernels take no mask, so SDPA's masked path runs (task heads only, never pretraining).
            keep = ~padding[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])
        return megalm_kernels.attention(q, k, v, causal=self.causal, impl=self.impl)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        # one gather of the sequence with SP
        q, kv = self.tp.column_parallel(x, (self.q.weight, self.q.bias, self.q.product), self._kv_linear())
        b, t, _ = q.shape
        q = q.view(b, t, self.local_heads, self.head_dim)
        k, v = self._keys_values(kv)
        # with context parallelism: the whole sequence, a share of the heads (outside the recomputed core)
        q, k, v = (sequence_to_heads(part, self.tp.mesh) for part in (q, k, v))
        if self.selective_checkpoint and torch.is_grad_enabled():
            y = checkpoint(self._core, q, k, v, padding, use_reentrant=False)
        else:
            y = self._core(q, k, v, padding)
        # (B, T, heads, D), back to this rank's part of the sequence with context parallelism
        return self.dropout(self.out(y.transpose(1, 2), product=output_projection(self.tp.mesh, self.out.product)))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * value of the two halves of the up projection, keeping only that projection for
    backward, where silu is recomputed (as Megatron's fused SwiGLU): autograd would also keep
    silu(gate), a third more of the MLP's activations."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value

    @staticmethod
    def backward(ctx, grad):
        gate, value = ctx.saved_tensors[0].chunk(2, dim=-1)
        sigmoid = torch.sigmoid(gate)
        return torch.cat((grad * value * sigmoid * (1 + gate * (1 - sigmoid)), grad * gate * sigmoid), dim=-1)


class MLP(nn.Module):
    """GELU MLP (gpt2 style) or SwiGLU (llama style), its hidden dim split over ranks."""

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        self.gated = cfg.style == "llama"
        bias = cfg.style == "gpt2"
        parts = [cfg.ffn_dim, cfg.ffn_dim] if self.gated else [cfg.ffn_dim]
        self.up = ColumnParallelLinear(cfg.d_model, parts, bias, tp, cfg.init_std)
        self.down = RowParallelLinear(cfg.ffn_dim, cfg.d_model, bias, tp, residual_std(cfg.init_std, cfg.n_layers))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = _SwiGLU.apply(h) if self.gated else F.gelu(h, approximate="tanh")
        return self.dropout(self.down(h))


class Embedding(nn.Module):
    """Token (+ learned position) embedding; with SP, leaves each rank its slice of the sequence."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int):
        super().__init__()
        self.tp = tp
        self.tok = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, tp, cfg.init_std)
        self.padded = bool(cfg.labels)  # a classifier's texts come right-padded with PAD
        self.pos = parameter((cfg.max_seq_len, cfg.d_model), cfg.init_std) if cfg.style == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        init_layer(self, layer_id, seed, tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.padded:  # a classifier's right padding (negative) looks up token 0: what it reads never depends on it
            input_ids = input_ids.clamp(min=0)
        x = self.tok(input_ids)  # with tp > 1 this sums the ranks' lookups (an all-reduce)
        if self.pos is not None:
            t = input_ids.shape[1]  # (with context parallelism, this rank's part of the sequence)
            start = first_position(t, self.tp.mesh)
            x = x + self.pos[start: start + t]
        return self.drop(self.tp.scatter_sequence(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: this rank's vocabulary slice of the logits."""
        return self.tp.column_parallel(x, (self.tok.weight, None))[0]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int, checkpointing: str = "none"):
        super().__init__()
        self.attn_norm = Norm(cfg, tp)
        self.attn = Attention(cfg, tp)
        self.mlp_norm = Norm(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.full_checkpoint = checkpointing == "full"
        self.attn.selective_checkpoint = checkpointing == "selective"
        init_layer(self, layer_id, seed, tp)

    def _forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), padding)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``padding`` (B, T), True at right-padding positions, matters to bidirectional attention only."""
        if self.full_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, padding, use_reentrant=False)
        return self._forward(x, padding)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int):
        super().__init__()
        self.norm = Norm(cfg, tp)
        init_layer(self, layer_id, seed, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Head(nn.Module):
    """The untied output projection: this rank's vocabulary slice of the logits."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int):
        super().__init__()
        self.tp = tp
        self.proj = ColumnParallelLinear(cfg.d_model, [cfg.vocab_size], False, tp, cfg.init_std)
        init_layer(self, layer_id, seed, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LossFunction:
    """Cross-entropy on vocabulary-parallel logits (also a pipeline's ``loss_fn``), against labels
    already aligned with the inputs (next tokens, or masked tokens: megalm.train.objective).

    ``target`` is the labels alone (the mean over those that count) or ``(labels, scale)``: their
    sum times ``scale``. Training passes the scale with every micro-batch: with ``scale = dp *
    grad_accum / (labels counted in the global batch)`` DeepSpeed's averaging over micro-batches and
    ranks yields the exact mean over the global batch, however the counted labels are spread
    (padding, masked objectives, skipped shards); evaluation passes 1 and sums.

    While ``correct`` is a tensor (evaluation sets it), the labels predicted exactly are added to it:
    inside the loss is the one place every layout, the pipeline's included, has the logits."""

    def __init__(self, tp: TPContext):
        self.tp = tp
        self.correct: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, target) -> torch.Tensor:
        labels, scale = target if isinstance(target, (tuple, list)) else (target, None)
        if self.correct is not None:
            self.correct += ((vocab_parallel_argmax(logits, self.tp) == labels) & (labels != IGNORE)).sum()
        if scale is None:
            return vocab_parallel_cross_entropy(logits, labels, self.tp, "mean")
        return vocab_parallel_cross_entropy(logits, labels, self.tp, "sum") * scale

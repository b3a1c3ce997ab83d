"""The pieces of a Transformer block: norms, rotary embeddings, attention, MLP.

Norms and the attention core go through ``megalm_kernels``, which picks the implementation
(Triton, CUDA, Apex, SDPA or plain torch) from ``model.kernels`` and the device.
"""

from __future__ import annotations

import math

import megalm_kernels
import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm (gpt2 style, with bias) or RMSNorm (llama style)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rms = cfg.style == "llama"
        self.eps, self.impl = cfg.norm_eps, cfg.kernels.norm
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return megalm_kernels.rms_norm(x, self.weight, self.eps, impl=self.impl)
        return megalm_kernels.layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, D)
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads)."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary | None):
        super().__init__()
        bias = cfg.style == "gpt2"
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
        self.out.is_residual_projection = True
        self.rotary = rotary
        self.dropout = nn.Dropout(cfg.dropout)
        self.impl = cfg.kernels.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = megalm_kernels.attention(q, k, v, causal=True, impl=self.impl)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.dropout(self.out(y))


class MLP(nn.Module):
    """GELU MLP (gpt2 style) or SwiGLU (llama style)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.style == "llama"
        bias = cfg.style == "gpt2"
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim * (2 if self.gated else 1), bias=bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=bias)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary | None):
        super().__init__()
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for matrices and embeddings; residual projections scaled by depth (GPT-2)."""
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = residual_std if getattr(m, "is_residual_projection", False) else cfg.init_std
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, cfg.init_std)

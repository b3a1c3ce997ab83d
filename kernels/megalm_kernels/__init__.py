"""megalm's fused kernels, the megalm-kernels distribution: attention, LayerNorm and RMSNorm.

Each op has a pure-torch reference (`reference`), Triton kernels (forward and backward), and for
LayerNorm a CUDA C++ extension built on first use. `impl="auto"` picks the fastest available for
the tensor's device and logs the choice once; an explicit impl that cannot run raises
KernelUnavailable. Importing this package does not import triton.
"""
import torch
import torch.nn.functional as F

from . import reference
from .dispatch import KernelUnavailable, choose, resolve

__all__ = ["attention", "layer_norm", "rms_norm", "choose", "KernelUnavailable", "reference"]


def attention(q, k, v, *, causal: bool = True, impl: str = "auto", scale: float | None = None):
    """Scaled dot-product attention. q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0.

    impl: "auto", "triton" (flash attention, GQA without repeating K/V), "sdpa" (torch's
    scaled_dot_product_attention) or "torch" (the explicit reference). Returns (B, Hq, T, D).
    """
    _check_attention(q, k, v)
    name = resolve("attention", impl, q)
    if name == "triton":
        from . import triton_attention
        return triton_attention.attention(q, k, v, causal=causal, scale=scale)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return reference.attention(q, k, v, causal=causal, scale=scale)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None, impl: str = "auto"):
    """LayerNorm over the last dim (bias may be None). With residual: returns
    (layer_norm(x + residual), x + residual). impl: auto, triton, cuda, apex, torch."""
    name = resolve("layer_norm", impl, x)
    if name == "triton":
        from . import triton_norm
        return triton_norm.layer_norm(x, weight, bias, eps, residual=residual)
    if name == "cuda":
        from . import cuda_layer_norm
        return cuda_layer_norm.layer_norm(x, weight, bias, eps, residual=residual)
    h = x if residual is None else x + residual
    if name == "apex":
        from .dispatch import apex_norms
        bias = torch.zeros_like(weight) if bias is None else bias  # Apex has no bias-free form
        y = apex_norms().fused_layer_norm_affine(h, weight, bias, h.shape[-1:], eps)
    else:
        bias = None if bias is None else bias.to(h.dtype)
        y = F.layer_norm(h, h.shape[-1:], weight.to(h.dtype), bias, eps)
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps: float = 1e-6, *, residual=None, impl: str = "auto"):
    """RMSNorm over the last dim. With residual: returns (rms_norm(x + residual), x + residual).
    impl: auto, triton, apex, torch."""
    name = resolve("rms_norm", impl, x)
    if name == "triton":
        from . import triton_norm
        return triton_norm.rms_norm(x, weight, eps, residual=residual)
    h = x if residual is None else x + residual
    if name == "apex":
        from .dispatch import apex_norms
        y = apex_norms().fused_rms_norm_affine(h, weight, h.shape[-1:], eps)
    else:
        y = F.rms_norm(h, h.shape[-1:], weight.to(h.dtype), eps)
    return y if residual is None else (y, h)


def _check_attention(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, Hq, T, D) and k, v (B, Hkv, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (b, hq, t, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if (b, t, d) != (bk, tk, dk) or hq % hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree: batch, length "
                         "and head dim must match and Hq must be a multiple of Hkv")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")

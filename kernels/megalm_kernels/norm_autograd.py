"""The autograd Function of the fused norms, shared by every backend (Triton, CUDA extension).

A backend supplies only its two kernels as a NormKernels pair; this module owns what the backends
have in common: argument checks, what is saved for backward, the optional residual output and
the gradients it adds to. Imports neither triton nor the extension.
"""
from typing import Callable, NamedTuple

import torch


class NormKernels(NamedTuple):
    """One backend's forward and backward norm kernels.

    forward(x, weight, bias, residual, eps) -> (y, h, mean, rstd): y shaped like x; h the
        (rows, hidden) tensor that was normalized (x + residual, or x itself); fp32 row stats.
    backward(dy, h, weight, mean, rstd, dh, has_bias) -> (dx, dweight, dbias or None): dx of
        shape (rows, hidden), dh (the gradient of the h output) already added when given.
    """
    forward: Callable
    backward: Callable


class FusedNorm(torch.autograd.Function):
    """norm(x [+ residual]) -> y, or (y, h) with a residual, computed by `kernels`."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, kernels: NormKernels):
        y, h, mean, rstd = kernels.forward(x, weight, bias, residual, eps)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.kernels = kernels
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.x_shape = x.shape
        # An output nobody uses gets None instead of a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(ctx.x_shape, device=h.device, dtype=h.dtype)
        dx, dw, db = ctx.kernels.backward(dy, h, weight, mean, rstd, dh, ctx.has_bias)
        dx = dx.view(ctx.x_shape)
        # h = x + residual: both inputs get the same gradient.
        return dx, dw, db, (dx if ctx.has_residual else None), None, None


def fused_norm(kernels: NormKernels, x, weight, bias, eps: float, residual=None):
    """Check the arguments, then run FusedNorm: y, or (y, x + residual) with a residual."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} != hidden size {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: got {tuple(residual.shape)} {residual.dtype}, "
                         f"x is {tuple(x.shape)} {x.dtype}")
    return FusedNorm.apply(x, weight, bias, residual, eps, kernels)

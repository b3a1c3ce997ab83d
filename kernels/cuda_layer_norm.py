"""LayerNorm as a CUDA C++ torch extension (kernels/csrc/), built with ninja on first use.

Same interface as the Triton LayerNorm: layer_norm(x, weight, bias, eps, residual=None) returns y,
or (y, x + residual). The build (torch.utils.cpp_extension.load) happens once per machine and
torch version; later processes reuse the cached library under TORCH_EXTENSIONS_DIR.
"""
import functools
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "layer_norm.cpp", CSRC / "layer_norm_kernels.cu"]


@functools.cache
def extension():
    """Build (or load the cached build of) the extension module."""
    from torch.utils.cpp_extension import load
    return load(name="megalm_layer_norm_cuda", sources=[str(s) for s in SOURCES],
                extra_include_paths=[str(CSRC)], extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)


@functools.cache
def _backward_parts(device_index: int) -> int:
    # Two blocks per SM: every SM busy, and the partial dweight rows stay few.
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


class CudaLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float):
        y, h, mean, rstd = extension().forward(x, residual, weight, bias, eps)
        normalized = h if residual is not None else x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(normalized, weight, mean, rstd)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x2, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(ctx.x_shape, device=x2.device, dtype=x2.dtype)
        dx, dw, db = extension().backward(dy, x2, weight, mean, rstd, dh, ctx.has_bias,
                                          _backward_parts(x2.device.index))
        dx = dx.view(ctx.x_shape)
        return dx, dw, db, (dx if ctx.has_residual else None), None


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None):
    """CUDA LayerNorm over the last dim; with residual returns (y, x + residual)."""
    return CudaLayerNorm.apply(x, weight, bias, residual, eps)

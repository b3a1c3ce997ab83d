"""LayerNorm as a CUDA C++ torch extension (csrc/ in this package), built with ninja on first use.

Same interface as the Triton LayerNorm: layer_norm(x, weight, bias, eps, residual=None) returns y,
or (y, x + residual); both run through the one autograd Function in norm_autograd. The build
(torch.utils.cpp_extension.load) happens once per machine and torch version; later processes
reuse the cached library under TORCH_EXTENSIONS_DIR.
"""
import functools
from pathlib import Path

import torch

from .norm_autograd import NormKernels, fused_norm

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


def _forward(x, weight, bias, residual, eps: float):
    y, h, mean, rstd = extension().forward(x, residual, weight, bias, eps)
    if residual is None:
        # The binding returns no h then; it normalized this view of x.
        h = x.reshape(-1, x.shape[-1]).contiguous()
    return y, h, mean, rstd


def _backward(dy, h, weight, mean, rstd, dh, has_bias: bool):
    return extension().backward(dy, h, weight, mean, rstd, dh, has_bias,
                                _backward_parts(h.device.index))


KERNELS = NormKernels(_forward, _backward)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None):
    """CUDA LayerNorm over the last dim; with residual returns (y, x + residual)."""
    return fused_norm(KERNELS, x, weight, bias, eps, residual)

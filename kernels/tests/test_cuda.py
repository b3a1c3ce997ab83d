"""Checks that need CUDA's compilers but no GPU, and the CUDA LayerNorm on a GPU.

- nvcc compiles megalm_kernels/csrc/layer_norm_kernels.cu (the kernels carry no torch headers, so
  this works with the CPU torch wheel); warnings fail the test.
- The Triton kernels compile for sm_90 through Triton's own toolchain: the interpreter accepts
  code the GPU compiler rejects, and this also pins "no register spills" for one configuration
  of each kernel.
- On a GPU: the extension builds and matches the float64 reference, forward and backward.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megalm_kernels as mk
from megalm_kernels import cuda_layer_norm

from test_norm import TOL, check_against_reference  # a sibling module: tests/ is no package


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc not on PATH: cannot compile-check the CUDA LayerNorm kernels")
def test_layer_norm_kernels_compile_with_nvcc(tmp_path):
    # C++20: what torch.utils.cpp_extension builds with since torch 2.10.
    source = cuda_layer_norm.CSRC / "layer_norm_kernels.cu"
    result = subprocess.run(
        ["nvcc", "-std=c++20", "-O3", "-gencode=arch=compute_90,code=sm_90",
         "--Werror", "all-warnings", "-c", str(source), "-o", str(tmp_path / "ln.o")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def _triton_can_compile_offline() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _triton_can_compile_offline(),
                    reason="triton (with its bundled ptxas) is not installed")
def test_triton_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from megalm_kernels.compile_report import report\n"
            "bad = [(l, u) for l, u in report(quick=True)"
            " if u['spill_bytes'] or ('attention' in l and not u['hgmma'])]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1, 300, 4096, 5000, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_layer_norm_matches_reference(hidden, dtype):
    for residual, bias in ((False, True), (True, False), (True, True)):
        check_against_reference("layer_norm", "cuda", 37, hidden, dtype, residual, bias,
                                TOL[dtype], seed=hidden)


@pytest.mark.gpu
def test_gpu_cuda_layer_norm_unaligned_rows_use_scalar_path():
    # A view starting one element in is not 16-byte aligned: the kernel must take its narrow path.
    base = torch.randn(8 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(8, 4096)
    w, b = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    y = mk.layer_norm(x, w, b, impl="cuda")
    ref = mk.reference.layer_norm(x.double(), w.double(), b.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]

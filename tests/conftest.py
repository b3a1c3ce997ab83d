"""Shared pytest set-up: CPU-only by default, Triton kernels in interpreter mode without a GPU."""
import os

import torch

# Triton decides at decoration time whether a kernel is interpreted, so this must be set before
# anything imports a kernel module. Without a GPU the interpreter runs kernels on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

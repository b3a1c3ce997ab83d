"""Pytest set-up of the kernel tests: Triton kernels in interpreter mode without a GPU, gpu-marked
tests skipped there, and NaN-poisoned output buffers on request.

Used both alone (`python -m pytest` in kernels/) and within megalm's suite; it imports nothing
from megalm or its tests.
"""
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


@pytest.fixture
def poison_outputs(monkeypatch):
    """poison_outputs(module): from then on the kernel module's `_alloc` hands out NaN-filled
    buffers, so any element a kernel never writes makes the test fail."""
    def nan_alloc(shape, like, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype or like.dtype)

    def poison(module):
        monkeypatch.setattr(module, "_alloc", nan_alloc)
    return poison

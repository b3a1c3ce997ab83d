"""Choose, per call, which implementation of a fused op runs, and say why.

`choose(op, impl, x)` resolves "auto" or checks an explicit request. The first time an op resolves
to an implementation it is logged once (logger "megalm.kernels", INFO). An explicit request that
cannot run raises KernelUnavailable naming what is missing: never a silent fallback.

Nothing here imports triton or builds the CUDA extension; the implementation modules are imported
only when first called, so `import megalm_kernels` works without triton.
"""
import functools
import importlib
import importlib.util
import logging
import os
from typing import NamedTuple

import torch

log = logging.getLogger("megalm.kernels")

IMPLS = {
    "attention": ("triton", "sdpa", "torch"),
    "layer_norm": ("triton", "cuda", "apex", "torch"),
    "rms_norm": ("triton", "apex", "torch"),
}
# What "auto" tries on a CUDA device, best first. Nothing here has been measured on a GPU yet
# (megalm's benchmarks/results/ holds no GPU table): norms lead with Triton on the strength of
# the anchors (fused norms reach ~87% of HBM bandwidth where torch eager does not); attention
# leads with SDPA, whose flash/cuDNN backends beat the Triton tutorial kernel in the published
# figures. Reorder from benchmarks/results/<device>/kernels.md once measured.
AUTO_ON_CUDA = {
    "attention": ("sdpa", "triton"),
    "layer_norm": ("triton", "torch"),
    "rms_norm": ("triton", "torch"),
}
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256

_logged: set[tuple[str, str]] = set()


class Like(NamedTuple):
    """What the choice depends on of a tensor: its device type, dtype and last dim."""

    device: str
    dtype: torch.dtype
    last_dim: int


class KernelUnavailable(RuntimeError):
    """An explicitly requested implementation cannot run here."""


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def apex_norms():
    """NVIDIA Apex's fused norm functions, or None. The PyPI package named `apex` is an
    unrelated web toolkit: only the real one has apex.normalization and its CUDA extension."""
    try:
        fused = importlib.import_module("apex.normalization.fused_layer_norm")
        importlib.import_module("fused_layer_norm_cuda")
    except Exception:  # wrong `apex`, missing extension, or a broken install
        return None
    return fused


def _missing(op: str, impl: str, x: "Like") -> str | None:
    """Why `impl` cannot run `op` on tensors like x, or None if it can."""
    if impl in ("torch", "sdpa"):
        return None
    if impl == "triton":
        if not triton_installed():
            return "the 'triton' package is not installed (pip install 'megalm-kernels[triton]')"
        if x.device != "cuda" and not interpreting():
            return (f"Triton kernels need a CUDA tensor (got {x.device}); CPU tensors run "
                    "only under TRITON_INTERPRET=1, as in the tests")
        if x.dtype not in TRITON_DTYPES:
            return f"the Triton kernels take fp16/bf16/fp32, not {x.dtype}"
        if op == "attention" and x.last_dim > TRITON_MAX_HEAD_DIM:
            return f"head dim {x.last_dim} > {TRITON_MAX_HEAD_DIM}"
        return None
    if impl == "cuda":
        if x.device != "cuda":
            return f"the CUDA LayerNorm needs a CUDA tensor (got {x.device})"
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) found to build the extension; set CUDA_HOME"
        if x.dtype not in TRITON_DTYPES:
            return f"the CUDA LayerNorm takes fp16/bf16/fp32, not {x.dtype}"
        return None
    if impl == "apex":
        if apex_norms() is None:
            return ("NVIDIA Apex with its CUDA extensions is not importable (build it from "
                    "github.com/NVIDIA/apex or use an NGC container; PyPI 'apex' is another "
                    "project)")
        if op == "rms_norm" and not hasattr(apex_norms(), "fused_rms_norm_affine"):
            return "this Apex build has no fused RMSNorm"
        if x.device != "cuda":
            return f"Apex kernels need a CUDA tensor (got {x.device})"
        return None
    raise AssertionError(impl)


def _auto(op: str, x: "Like") -> tuple[str, str]:
    default = "sdpa" if op == "attention" else "torch"
    if x.device != "cuda":
        return default, (f"auto on {x.device}: Triton kernels need CUDA; "
                         "interpreter only in tests")
    skipped = []
    for impl in AUTO_ON_CUDA[op]:
        why_not = _missing(op, impl, x)
        if why_not is None:
            reason = "auto on cuda: first available of " + " > ".join(AUTO_ON_CUDA[op])
            return impl, reason + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{impl} unavailable: {why_not}")
    return default, "auto on cuda: " + "; ".join(skipped)


def choose(op: str, impl: str, x: torch.Tensor) -> tuple[str, str]:
    """(implementation, reason) that `op` with `impl` resolves to for tensors like x."""
    return _choose(op, impl, Like(x.device.type, x.dtype, x.shape[-1]))


def _choose(op: str, impl: str, x: "Like") -> tuple[str, str]:
    if op not in IMPLS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(IMPLS)}")
    if impl == "auto":
        return _auto(op, x)
    if impl not in IMPLS[op]:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected 'auto' or one of {IMPLS[op]}")
    why_not = _missing(op, impl, x)
    if why_not is not None:
        raise KernelUnavailable(f"{op}: impl={impl!r} cannot run: {why_not}")
    return impl, "requested explicitly"


def resolve(op: str, impl: str, x: torch.Tensor) -> str:
    """choose(), logging the first time each (op, implementation) pair is used."""
    return _resolve(op, impl, x.device.type, x.dtype, x.shape[-1])


def _resolve(op: str, impl: str, device: str, dtype: torch.dtype, last_dim: int) -> str:
    name, reason = _choose(op, impl, Like(device, dtype, last_dim))
    if (op, name) not in _logged:
        _logged.add((op, name))
        log.info("%s: %s (%s)", op, name, reason)
    return name


# Under torch.compile _resolve runs once, while the graph is traced, and its answer is a constant of the
# graph: the choice depends only on what the graph is specialised on (device, dtype, last dim), and
# tracing the logging and the set of pairs logged would break the graph at every norm and attention
# and recompile it once the set changes. This is what torch.compiler.assume_constant_result does; the
# decorator itself imports torch._dynamo, and with it triton, which importing this package must not
# (tests/test_train.py checks that a compiled block is one graph, so a rename in torch would show).
_resolve._dynamo_marked_constant = True

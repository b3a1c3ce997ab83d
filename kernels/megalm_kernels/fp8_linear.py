"""FP8 linear layers for training, through torchao's float8 training (dynamic scaling), as a function
megalm's tensor-parallel linears call in place of ``F.linear``; and the timing that decides where
they pay.

``Float8Product(recipe)`` computes ``x @ W^T (+ b)`` with x, W and the output gradient cast to FP8
(e4m3 forward, e5m2 gradients) with scales computed on the fly: per tensor (``tensorwise``, cuBLAS)
or per row (``rowwise``, CUTLASS), torchao's recipes. The weights stay in the model's precision (bf16
with fp32 master copies in the optimizer), so nothing saved depends on FP8. ``emulate=True`` runs
the same casts and scales and multiplies in high precision: torchao's CPU path, for tests.

FP8 matmuls run twice as fast as bf16 on Hopper, but the casts are extra passes over the input, the
weight and the gradient: at small shapes a converted linear is slower than bf16. ``time_linear``
measures one shape's forward and backward both ways, casts included, on this device
(``megalm bench kernels --ops fp8`` over a grid of shapes; a run with ``train.fp8.layers=auto``
over its own shapes at start-up).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RECIPES = ("tensorwise", "rowwise")


def _import_torchao() -> None:
    """Import torchao without two warnings that ask nothing of a user: on a torch without CUDA, one
    for each CUDA kernel library it cannot load there (the emulated path uses none); and torch's
    deprecation notice for how torchao registers an enum with torch.compile."""
    import logging

    quiet = [logging.getLogger("torch.utils._pytree")] + ([logging.getLogger("torchao")]
                                                          if not torch.cuda.is_available() else [])
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ImportError("FP8 linear layers need torchao: pip install 'megalm[fp8]' (torchao>=0.18)") from e
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def float8_config(recipe: str, emulate: bool):
    """torchao's Float8LinearConfig of a recipe (tensorwise or rowwise)."""
    _import_torchao()
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {RECIPES}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    return Float8LinearConfig(**{**vars(config), "emulate": emulate}) if emulate else config


class Float8Product:
    """``x @ W^T (+ b)`` in FP8 with dynamic scaling: a drop-in for ``F.linear`` (torchao's
    ``Float8Linear.forward`` without the module)."""

    def __init__(self, recipe: str, emulate: bool = False):
        self.recipe, self.emulate = recipe, emulate
        self.config = float8_config(recipe, emulate)
        from torchao.float8.float8_linear import LinearMMConfig, ScaledMMConfig

        c = self.config
        self.mm_config = LinearMMConfig(*(ScaledMMConfig(emulate, gemm.use_fast_accum, False, c.pad_inner_dim)
                                          for gemm in (c.gemm_config_output, c.gemm_config_grad_input,
                                                       c.gemm_config_grad_weight)))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        y = matmul_with_hp_or_float8_args.apply(x, weight.t(), self.mm_config, self.config)
        return y if bias is None else y + bias.to(y.dtype)

    def __repr__(self) -> str:
        return f"fp8 {self.recipe}{' (emulated)' if self.emulate else ''}"


def linear_call(m: int, n: int, k: int, product, device: torch.device, dtype=torch.bfloat16):
    """One forward and backward of ``product(x, W)`` with x (m, k) and W (n, k), as a function to time."""
    g = torch.Generator(device=device).manual_seed(m * 31 + n * 7 + k)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=g) / k ** 0.5).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=g)

    def forward_backward():
        torch.autograd.grad(product(x, w), (x, w), dy)

    return forward_backward


def time_linear(m: int, n: int, k: int, product, device: torch.device) -> float:
    """Milliseconds of ``linear_call``, every cast included (median of repeated calls; CUDA events on a GPU)."""
    from .benchmarking import bench_ms

    return bench_ms(linear_call(m, n, k, product, device), device)


def compare(m: int, n: int, k: int, recipe: str, device: torch.device, emulate: bool = False) -> dict:
    """One shape's forward+backward in bf16 and in FP8: ``{"bf16_ms", "fp8_ms", "speedup"}``."""
    bf16 = time_linear(m, n, k, F.linear, device)
    fp8 = time_linear(m, n, k, Float8Product(recipe, emulate), device)
    return {"bf16_ms": bf16, "fp8_ms": fp8, "speedup": bf16 / fp8}

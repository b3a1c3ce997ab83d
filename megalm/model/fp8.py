"""FP8 linear layers, only where they pay (``train.fp8``).

The Transformer blocks' linear layers (q, k/v, attention output, MLP up and down; not the embedding
or the head) can multiply in FP8 through torchao's float8 training (megalm_kernels.fp8_linear): the
layer keeps its bf16 weight (fp32 master copies in the optimizer, so checkpoints are the same as a
bf16 run's and resume either way) and gets an FP8 ``product`` in place of ``F.linear``.

FP8 is not faster everywhere: each matmul first casts its input, weight and output gradient, three
extra passes over memory that a small matmul does not earn back. So ``train.fp8.layers=auto``
converts a layer only when its shape on this rank, (tokens per micro-batch, out, in), runs forward
and backward at least ``train.fp8.min_speedup`` times faster in FP8 on this device: timed at
start-up, or read from a table that ``megalm bench kernels --ops fp8`` wrote on the same device
(``train.fp8.timings``). ``all`` converts every block linear. Either way the run logs which layers
were converted and why not the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.config import Config
from megalm.errors import ConfigError
from megalm.model.layers import Block
from megalm.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

log = logging.getLogger("megalm.model")

Shape = tuple[int, int, int]  # (tokens, out, in) of one linear on one rank


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks' linear layers, by module name."""
    found = {}
    for block_name, block in model.named_modules():
        if isinstance(block, Block):
            for name, module in block.named_modules():
                if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                    found[f"{block_name}.{name}"] = module
    return found


def shape(module: nn.Module, tokens: int) -> Shape:
    """(tokens, out, in) of a linear's matmul on this rank (ZeRO-3's partitioned weight by its real shape)."""
    out, inp = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return tokens, out, inp


def check_device(cfg: Config, device: torch.device) -> None:
    """FP8 matmuls need a GPU that has them (compute capability 8.9: Ada, Hopper and newer), unless emulated."""
    f = cfg.train.fp8
    if f.emulate:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.fp8.layers={f.layers}: FP8 matmuls need a CUDA GPU with FP8 (Hopper, Ada or newer), "
                          f"this run is on {device.type}; train.fp8.emulate=true runs the same casts with "
                          f"high-precision matmuls (slower: for tests)")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(f"train.fp8.layers={f.layers}: {torch.cuda.get_device_name(device)} (compute capability "
                          f"{capability[0]}.{capability[1]}) has no FP8 matmuls; they need 8.9 or newer (Ada, Hopper)")


def recorded_speedups(path: str, recipe: str, device_name: str) -> dict[Shape, float]:
    """FP8 speedups by shape from a ``megalm bench kernels --ops fp8`` result of this device."""
    try:
        table = json.loads(Path(path).read_text())
        rows, recorded_on = table["rows"], table["meta"]["device"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train.fp8.timings: cannot read {path} as a megalm bench kernels result: {e}") from None
    if recorded_on != device_name:
        raise ConfigError(f"train.fp8.timings: {path} was timed on {recorded_on}, this run is on {device_name}: "
                          f"time this device (megalm bench kernels --ops fp8) or leave the setting empty")
    ms: dict[tuple[Shape, str], float] = {}
    for row in rows:
        if row.get("op") == "linear" and row.get("mode") == "fwd+bwd":
            ms[tuple(int(v) for v in row["shape"].split("x")), row["impl"]] = row["ms"]
    fp8 = f"fp8-{recipe}"
    return {s: ms[s, "bf16"] / ms[s, fp8] for s, impl in ms if impl == "bf16" and (s, fp8) in ms}


def measured_speedups(shapes: set[Shape], recipe: str, emulate: bool, device: torch.device) -> dict[Shape, float]:
    """Each shape's FP8 speedup, timed here now (forward and backward, casts included)."""
    from megalm_kernels.fp8_linear import Float8Product, time_linear

    product = Float8Product(recipe, emulate)
    return {s: time_linear(*s, F.linear, device) / time_linear(*s, product, device) for s in sorted(shapes)}


def speedups(shapes: set[Shape], cfg: Config, device: torch.device, device_name: str) -> tuple[dict[Shape, float], str]:
    """Collective: the FP8 speedup of every rank's shapes, decided on rank 0 (from the timing table,
    and timing what it lacks) so that every rank converts alike; and where the figures came from."""
    f = cfg.train.fp8
    found = recorded_speedups(f.timings, f.recipe, device_name) if f.timings else {}  # (a bad table fails every rank)
    everyone = [shapes]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, shapes)
    decided = [None, ""]
    if not dist.is_initialized() or dist.get_rank() == 0:
        missing = set().union(*everyone) - set(found)
        found |= measured_speedups(missing, f.recipe, f.emulate, device) if missing else {}
        timed = f"{len(missing)} shape(s) timed on {device_name} at start-up" if missing else ""
        source = "; ".join(part for part in (f"from {f.timings}" if f.timings else "", timed) if part)
        decided = [found, source]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decided, src=0)
    return decided[0], decided[1]


def convert(model: nn.Module, cfg: Config, tokens: int, device: torch.device, device_name: str) -> str:
    """Collective under train.fp8.layers=auto: give the blocks' linears FP8 products where
    ``train.fp8`` says; returns what was decided, a line per layer shape, for the log."""
    from megalm_kernels.fp8_linear import Float8Product

    f = cfg.train.fp8
    check_device(cfg, device)
    linears = block_linears(model)
    shapes = {name: shape(module, tokens) for name, module in linears.items()}
    gains, source = speedups(set(shapes.values()), cfg, device, device_name) if f.layers == "auto" else \
        ({}, "not timed: train.fp8.layers=all")
    product = Float8Product(f.recipe, f.emulate)
    verdicts = {}
    for name, module in linears.items():
        gain = gains.get(shapes[name])
        if f.layers == "all" or gain >= f.min_speedup:
            module.product = product
            verdicts[name] = "FP8" + (f", {gain:.2f}x bf16's speed" if gain is not None else "")
        else:
            verdicts[name] = f"kept in bf16: FP8 runs at {gain:.2f}x bf16's speed here (< train.fp8.min_speedup=" \
                             f"{f.min_speedup:g})"
    by_shape: dict[tuple[Shape, str], set[str]] = {}
    for name, verdict in verdicts.items():
        by_shape.setdefault((shapes[name], verdict), set()).add(".".join(name.split(".")[-2:]))  # e.g. attn.q
    converted = sum(v.startswith("FP8") for v in verdicts.values())
    lines = [f"fp8: {converted} of {len(verdicts)} block linears on this rank in FP8 ({f.recipe} scaling"
             f"{', emulated' if f.emulate else ''}; speedups {source})"]
    for (s, verdict), kinds in sorted(by_shape.items()):
        lines.append(f"  {s[0]}x{s[1]}x{s[2]} (tokens x out x in: {', '.join(sorted(kinds))}): {verdict}")
    return "\n".join(lines)

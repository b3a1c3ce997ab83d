"""Starting torch.distributed for one plain process, torchrun, or srun+torchrun.

A plain ``python``/``megalm`` process becomes a world of one, so the training code has one path.
The backend is NCCL on CUDA and gloo on CPU; DeepSpeed is initialized on top of the same group.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megalm.errors import ConfigError, UsageError

log = logging.getLogger("megalm")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def node_name() -> str:
    """The node's name as the scheduler knows it (Slurm), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def launched_world_size() -> int:
    """Processes the launcher started (1 for a plain process); readable before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """The device ``requested`` (auto, cpu, cuda, or a torch device name such as cuda:1) as this
    process uses it. ``option`` says where it was asked for, a config key or a command's flag, for
    the error when it cannot be had: CUDA on a machine without it is a usage error, not a fallback."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        if option.startswith("-"):  # a command's flag
            raise UsageError(f"{option} {requested}: {why}; use {option} cpu (or auto, which takes a GPU when there "
                             f"is one)")
        raise ConfigError(f"{option}={requested}: {why}; use {option}=cpu or {option}=auto (a GPU when there is one)")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested in ("auto", "cpu"):
        return torch.device("cpu")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UsageError(f"{option}: {requested!r} is not a device; expected auto, cpu, cuda or cuda:N") from None


def init_distributed(requested_device: str = "auto", timeout_s: float = 1800.0) -> World:
    """Join (or create) the process group; idempotent."""
    if "RANK" not in os.environ:  # a plain process: a world of one on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if not dist.is_initialized():
        import deepspeed  # imported here: it takes seconds, and `megalm config` never needs it

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cpu":
            _skip_shm_op()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   verbose=False)
    return World(rank, world_size, local_rank, device)


def _skip_shm_op() -> None:
    """DeepSpeed's communication backend compiles its shared-memory all-reduce (a C++ op: about 30 s on a
    machine's first CPU run, and again whenever torch's path changes) when it starts on a CPU. Only
    DeepSpeed's ``inference_all_reduce`` uses it, which training never calls: every collective of
    megalm's goes through torch.distributed (gloo). So it is not built."""
    import importlib

    # (by module path: the package deepspeed.comm binds the name ``torch`` to torch itself)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("comm: gloo; DeepSpeed's shared-memory inference all-reduce (a C++ op training never calls) is not "
                 "compiled")


def all_reduce_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()

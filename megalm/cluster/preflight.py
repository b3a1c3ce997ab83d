"""Checks before any rank starts: what would otherwise hang or crash later fails now, in one line.

Run on every node by the node launcher (``python -m megalm.cluster.node``) before torchrun:

- the layout: tp x pp x dp must use exactly the nodes x processes started;
- the node: as many GPUs as the job asks for;
- the rendezvous: the first node's port is free, the other nodes reach it within
  ``slurm.rdzv_wait_s`` (its torchrun starts listening a moment after its own preflight);
- shared storage: the prepared data and the run dir are the same directory on every node (each
  node leaves a mark in the run dir and waits to see every other node's).

It prints the layout, the versions (python, torch, CUDA, NCCL, DeepSpeed, megalm) and the endpoint.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import time
from pathlib import Path

from megalm.config import Config, data_parallel_size, validate
from megalm.data.location import Location
from megalm.errors import ConfigError, DataError, UsageError
from megalm.parallel.distributed import node_name


class PreflightError(UsageError):
    """Something that would make the job hang or fail later, named now (exit code 2)."""


def versions() -> str:
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        parts += [f"CUDA {torch.version.cuda}", f"NCCL {nccl}"]
    for package in ("deepspeed", "megalm", "megalm-kernels"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} missing")
    return ", ".join(parts)


def check_layout(cfg: Config, nnodes: int, nproc: int) -> str:
    world = nnodes * nproc
    try:
        validate(cfg, world)
    except ConfigError as e:
        raise PreflightError(f"{nnodes} nodes x {nproc} processes = {world}: {e}") from None
    p = cfg.parallel
    return (f"layout: {nnodes} nodes x {nproc} processes = {world} = tp {p.tp} x pp {p.pp} x dp "
            f"{data_parallel_size(cfg, world)}")


def check_gpus(nproc: int) -> str:
    import torch

    have = torch.cuda.device_count()
    if have < nproc:
        raise PreflightError(f"{node_name()} has {have} GPUs, the job starts {nproc} processes per node")
    return f"GPUs: {have} ({torch.cuda.get_device_name(0)})"


def check_rendezvous(endpoint: str, first: bool, wait_s: float) -> str:
    host, port = endpoint.rsplit(":", 1)
    try:
        address = socket.gethostbyname(host)
    except OSError as e:
        raise PreflightError(f"rendezvous host {host!r} does not resolve on {node_name()}: {e}") from None
    if first:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds it
            try:
                s.bind(("", int(port)))
            except OSError as e:
                raise PreflightError(f"rendezvous port {port} on {node_name()} is taken ({e.strerror}); another "
                                     f"job's? pick another port") from None
        return f"rendezvous: {endpoint} ({address}), hosted here"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((address, int(port)), timeout=2):
                return f"rendezvous: {endpoint} ({address}), reachable"
        except OSError as e:
            if time.monotonic() > deadline:
                raise PreflightError(
                    f"{node_name()} cannot reach the rendezvous at {endpoint} ({address}) within {wait_s:.0f} s "
                    f"({e.strerror or e}): check that the first node started, and the network between nodes "
                    f"(firewall; NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name the interface to use)") from None
            time.sleep(1)


def check_shared_storage(cfg: Config, nnodes: int, job_id: str, wait_s: float) -> str:
    """Every node must see the prepared data, and the same run dir (checkpoints span nodes)."""
    data = check_data(cfg, nnodes)
    marks = Path(cfg.train.run_dir) / "slurm" / f"preflight-{job_id}"
    try:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / node_name()).write_text(socket.gethostname())
    except OSError as e:
        raise PreflightError(f"train.run_dir {cfg.train.run_dir}: not writable on {node_name()} ({e})") from None
    deadline = time.monotonic() + wait_s
    while len(list(marks.iterdir())) < nnodes:
        if time.monotonic() > deadline:
            seen = sorted(p.name for p in marks.iterdir())
            raise PreflightError(f"train.run_dir {cfg.train.run_dir}: {node_name()} sees the marks of {seen} only, "
                                 f"not of all {nnodes} nodes: the run dir must be on storage every node shares")
        time.sleep(0.5)
    return f"storage: data.dir ({data}) and train.run_dir shared by all {nnodes} nodes" if nnodes > 1 else \
        f"storage: data.dir {cfg.data.dir} ({data})"


def check_data(cfg: Config, nnodes: int) -> str:
    """This node reaches the prepared data.dir: a local one has its index.json (with one node, rank 0
    may still prepare it), a remote one (http, pipe:) answers with it."""
    location = Location(cfg.data.dir, cfg.data.shards, cfg.data.cache_dir)
    if location.is_local:
        if (Path(cfg.data.dir) / "index.json").is_file():
            return "prepared"
        if nnodes > 1:
            raise PreflightError(f"data.dir {cfg.data.dir}: no index.json on {node_name()}; prepare it first "
                                 f"(megalm prepare) on a filesystem every node mounts")
        return "rank 0 prepares it"
    try:
        manifest = location.manifest()
    except DataError as e:
        raise PreflightError(f"data.dir {cfg.data.dir}: {node_name()} cannot read its index.json: {e}") from None
    return f"remote, {len(manifest.train)} train shards"


def preflight(cfg: Config, *, nnodes: int, nproc: int, gpus: bool, endpoint: str | None, first: bool,
              job_id: str):
    """Every check, in order, yielding a report line each; raises PreflightError. Storage comes
    before the rendezvous: the first node starts listening only once its own checks passed."""
    yield f"node {node_name()}: {versions()}"
    yield check_layout(cfg, nnodes, nproc)
    if gpus:
        yield check_gpus(nproc)
    yield check_shared_storage(cfg, nnodes, job_id, cfg.slurm.rdzv_wait_s)
    if endpoint:
        yield check_rendezvous(endpoint, first, cfg.slurm.rdzv_wait_s)

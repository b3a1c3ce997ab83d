"""Test helpers: a small real corpus, tiny configs, and launching megalm in fresh processes.

Training runs go through the real entry points (``megalm`` and ``torchrun``) in subprocesses, so
each test gets its own process group and DeepSpeed state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from megalm.data.sources import python_stdlib_root
from megalm.generate import load_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/quickstart.yaml"
CORPUS_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py", "glob.py",
                "keyword.py", "stat.py", "string.py", "numbers.py", "abc.py", "copy.py", "queue.py",
                "sched.py", "this.py", "token.py", "struct.py", "getopt.py", "base64.py", "random.py",
                "calendar.py", "difflib.py", "pprint.py"]

# Small everything: the suite must stay fast on 2 cores.
TINY = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.seq_len=32", "data.vocab_size=512",
    "data.shard_tokens=4000", "data.eval_sequences=16", "train.global_batch=4", "train.micro_batch_size=4",
    "train.steps=5", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=5", "train.progress=false",
    "train.wandb.mode=disabled", "train.lr=3e-3",
]


def make_corpus(root: Path) -> Path:
    """A directory of real Python sources copied from the standard library."""
    src = python_stdlib_root()
    root.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_FILES:
        shutil.copy(src / name, root / name)
    return root


def env() -> dict:
    e = dict(os.environ)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # each run is its own world
        e.pop(var, None)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run_megalm(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", *args], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megalm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "megalm.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def compare_parameters(run_dir: Path, reference: Path) -> tuple[float, float]:
    """(relative norm of the weight difference, largest single difference) of two runs' final models."""
    ref = dict(load_model(reference)[0].named_parameters())
    got = dict(load_model(run_dir)[0].named_parameters())
    assert got.keys() == ref.keys()
    with torch.no_grad():
        diff = torch.sqrt(sum(((got[k] - ref[k]) ** 2).sum() for k in ref))
        norm = torch.sqrt(sum((ref[k] ** 2).sum() for k in ref))
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    return (diff / norm).item(), worst

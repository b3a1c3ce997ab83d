"""Test helpers: a small real corpus, tiny configs, and launching megalm in fresh processes.

Training runs go through the real entry points (``megalm`` and ``torchrun``) in subprocesses, so
each test gets its own process group and DeepSpeed state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from megalm.data.sources import python_stdlib_root
from megalm.sampling import load_model

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
    "train.plot=false",  # matplotlib costs ~0.8 s a run; the tests of the pictures ask for them
]

# a storage command (data.dir=pipe:...) that refuses train shards to rank $DENY_RANK once it has
# served it $DENY_AFTER of them, with a message of its own, as an access-control failure would
DENY_SCRIPT = """#!/bin/sh
case "$1" in train-*)
  if [ "$RANK" = "$DENY_RANK" ]; then
    n=$(cat "$0.count.$RANK" 2>/dev/null || echo 0); echo $((n + 1)) > "$0.count.$RANK"
    if [ "$n" -ge "$DENY_AFTER" ]; then echo "storage: access denied to $1 for rank $RANK" >&2; exit 3; fi
  fi;;
esac
exec cat "$DATA/$1"
"""


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


def run_megalm(*args: str, check: bool = True, timeout: int = 300,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", *args], capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megalm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, *args: str, timeout: int = 600, extra_env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "megalm.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, cwd=REPO,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows, read as strict JSON (a NaN or Infinity, which Python's json would
    take, fails the test: other readers refuse them)."""
    return [json.loads(line, parse_constant=_not_json) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _not_json(constant: str):
    raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")


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


def _as_a_job(then=None):
    """In the child, before it starts: Ctrl-C and Ctrl-\\ at their defaults, as a terminal starts a job.
    A test run started in the background by a script inherits them ignored (bash ignores both for
    ``cmd &`` without job control), and a program that finds a signal ignored keeps it so."""
    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        if then is not None:
            then()
    return preexec


class Watched:
    """A command running in the background whose stderr lines are kept with the second each came
    (from its start), so a test can wait for a line, signal it, and time how it ends. Whatever a
    test leaves running is killed after it (tests/conftest.py)."""

    running: list["Watched"] = []

    def __init__(self, cmd: list[str], *, extra_env: dict | None = None, preexec_fn=None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=_as_a_job(preexec_fn),
                                     start_new_session=True)  # its own process group, as a terminal's job
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Watched.running.append(self)

    def kill(self) -> None:
        """Kill the command and everything it started (its process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 120) -> float:
        """Seconds from the start until a line containing ``text`` came."""
        deadline = time.monotonic() + timeout
        while (t := self.at(text)) is None:
            assert self.proc.poll() is None or self._reader.is_alive(), f"ended before {text!r}:\n{self.stderr[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.stderr[-4000:]}"
            time.sleep(0.05)
        return t

    def at(self, text: str) -> float | None:
        return next((t for t, line in list(self.lines) if text in line), None)

    def signal(self, signum: int) -> None:
        """``signum`` to the whole process group, as a terminal's Ctrl-C reaches a job."""
        os.killpg(self.proc.pid, signum)

    def end(self, timeout: float = 300) -> "Watched":
        self.proc.wait(timeout=timeout)
        self.ended = time.monotonic() - self.started
        self._reader.join(timeout=10)
        return self

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def last(self, start: str) -> str:
        """The last stderr line that starts with ``start`` (a rank's prefix)."""
        lines = [line for _, line in self.lines if line.startswith(start)]
        assert lines, f"no line starts with {start!r}:\n{self.stderr[-6000:]}"
        return lines[-1]


def megalm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megalm.cli", *args]


def denied(small_shards, rank: int, after: int) -> tuple[list[str], dict]:
    """Overrides and environment of a run whose storage refuses rank ``rank`` after ``after`` shards."""
    out, deny = small_shards
    for old in deny.parent.glob("deny.sh.count.*"):
        old.unlink()
    return [f"data.dir=pipe:{deny} {{}}", f"data.source={out}"], \
        {"DATA": str(out), "DENY_RANK": str(rank), "DENY_AFTER": str(after)}


def launcher(*args: str, nproc: int, extra_env: dict | None = None) -> Watched:
    """``launch/train.sh`` as a user runs it (its python3 is this one)."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return Watched(["bash", "launch/train.sh", *args],
                   extra_env={"NPROC": str(nproc), "PATH": path, **(extra_env or {})})


def wait_for_steps(run: Watched, run_dir, step: int) -> None:
    """Until ``run`` has logged training step ``step``."""
    while not (run_dir / "metrics.jsonl").is_file() or max(r["step"] for r in metrics(run_dir)) < step:
        assert run.proc.poll() is None, run.stderr[-3000:]
        time.sleep(0.1)

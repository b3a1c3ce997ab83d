"""One node's launcher: preflight, then torchrun, with the signals that ask training to stop.

    python -m megalm.cluster.node CONFIG [overrides] --nnodes N --nproc-per-node G
        [--rdzv HOST:PORT --rdzv-id ID] [--gpus]

Slurm's srun starts one of these per node (slurm/); ``launch/train.sh`` runs one for a single node.
torchrun does not pass SIGUSR1 (the time limit is near, or the job is preempted) to its workers,
and dies of it: so torchrun is started ignoring it, and this launcher forwards SIGUSR1 and SIGTERM
to the workers themselves (see ``Forwarder``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m megalm.cluster.node", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--rdzv", help="HOST:PORT of the rendezvous on the first node (omit for one node)")
    p.add_argument("--rdzv-id", default="megalm")
    p.add_argument("--gpus", action="store_true", help="processes use GPUs: check that the node has enough")
    return p.parse_intermixed_args(argv)


def torchrun_command(args, cfg) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nnodes}",
           f"--nproc_per_node={args.nproc_per_node}", "--max_restarts=0"]
    if args.rdzv:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv}", f"--rdzv_id={args.rdzv_id}",
                f"--rdzv_conf=join_timeout={cfg.slurm.rdzv_wait_s}"]
    else:
        cmd.append("--standalone")
    return cmd + ["-m", "megalm.cli", "train", args.config, *args.overrides]


class Forwarder:
    """Passes stop signals on to torchrun's workers. It is installed first thing, so a signal that
    comes while the node is still starting is kept; each worker gets it once, as soon as it has a
    handler for it (Linux tells: /proc/PID/status, SigCgt): before that (still importing) it would
    be ignored, and after (exiting, handlers gone) it would kill a worker that already stopped."""

    def __init__(self):
        self.pending: set[int] = set()
        self.sent: set[tuple[int, int]] = set()  # (worker pid, signal)
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        print(f"megalm node: got {signal.Signals(signum).name}; passing it to the training processes",
              file=sys.stderr, flush=True)
        self.pending.add(signum)

    def forward(self, torchrun: subprocess.Popen) -> None:
        if not self.pending:
            return
        try:
            workers = psutil.Process(torchrun.pid).children()
        except psutil.Error:
            return
        for worker in workers:
            for signum in self.pending:
                if (worker.pid, signum) not in self.sent and catches(worker.pid, signum):
                    try:
                        worker.send_signal(signum)
                        self.sent.add((worker.pid, signum))
                    except psutil.Error:
                        pass


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def main(argv: list[str] | None = None) -> int:
    forwarder = Forwarder()
    args = parse(argv)
    from megalm.cluster.preflight import PreflightError, preflight  # imports torch: after the handlers
    from megalm.config import ConfigError, load_config
    from megalm.train.watchdog import VERDICT_FILE

    try:
        cfg = load_config(args.config, args.overrides)
        first = os.environ.get("SLURM_NODEID", "0") == "0"
        job = os.environ.get("SLURM_JOB_ID", str(os.getppid()))
        for line in preflight(cfg, nnodes=args.nnodes, nproc=args.nproc_per_node, gpus=args.gpus,
                              endpoint=args.rdzv, first=first, job_id=job):
            print(f"megalm preflight: {line}", file=sys.stderr, flush=True)
    except (ConfigError, PreflightError) as e:
        print(f"megalm preflight: error: {e}", file=sys.stderr, flush=True)
        return 2
    torchrun = subprocess.Popen(torchrun_command(args, cfg),
                                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    verdicts = Path(cfg.train.run_dir) / VERDICT_FILE
    before = verdicts.stat().st_size if verdicts.is_file() else 0
    while torchrun.poll() is None:
        forwarder.forward(torchrun)
        time.sleep(0.2)
    if torchrun.returncode != 0 and cfg.train.watchdog_timeout_s:
        await_verdict(verdicts, before, cfg.train.watchdog_timeout_s + 30)
    return torchrun.returncode


def await_verdict(verdicts: Path, before: int, wait_s: float) -> None:
    """This node's training failed. Before its failure ends the job (srun --kill-on-bad-exit), give
    the watchdog on the surviving ranks the time to name the rank that failed first."""
    print(f"megalm node: training failed on this node; waiting up to {wait_s:.0f} s for the watchdog's verdict",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if verdicts.is_file() and verdicts.stat().st_size > before:
            return
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())

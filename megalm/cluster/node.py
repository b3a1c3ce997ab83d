"""One node's launcher: preflight, then torchrun, with the signals that ask training to stop.

    python -m megalm.cluster.node CONFIG [overrides] --nnodes N --nproc-per-node G
        [--rdzv HOST:PORT --rdzv-id ID] [--gpus]

Slurm's srun starts one of these per node (slurm/); ``launch/train.sh`` runs one for a single node.
torchrun does not pass SIGUSR1 (the time limit is near, or the job is preempted) to its workers,
and dies of it; on Ctrl-C it sends its workers a second SIGINT, which would stop them without
their save. So torchrun runs in a session of its own, ignoring SIGUSR1, and this launcher forwards
SIGUSR1, SIGTERM and SIGINT to the workers itself (see ``Forwarder``), once each.

A rank that dies without a word (killed, out of memory) or a run the watchdog ends is restarted
on a one-node run, from its newest checkpoint, up to ``slurm.max_restarts`` times (``restartable``);
a rank's own error is not (it would only happen again), nor is a run stopped by a signal. The nodes
of a run of several restart together, in a fresh rendezvous: the job script starts its step again
(megalm/cluster/job.sh, restart.py), reading how each node ended from the record this launcher
writes in ``RUN_DIR/slurm/steps/STEP/NODE.json``.

When training ends badly the launcher's last line says why: the first failure or the watchdog's
verdict, as the ranks recorded it in ``RUN_DIR/failures.txt``. Its exit code is the run's (see
megalm/errors.py): 75 when a stop signal ended it after its save, 3 for a watchdog verdict, 1 for
an error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from megalm.errors import (EXIT_ERROR, EXIT_STOPPED, EXIT_USAGE, EXIT_WATCHDOG, FAILURES_FILE, ConfigError,
                           exit_now, say)

PR_SET_PDEATHSIG = 1  # prctl: the signal a process gets when its parent dies


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
    cmd = [sys.executable, "-m", "megalm.cluster.torchrun", f"--nnodes={args.nnodes}",
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
        for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        say(f"megalm node: got {signal.Signals(signum).name}; passing it to the training processes")
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
    from megalm.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        first = os.environ.get("SLURM_NODEID", "0") == "0"
        job = os.environ.get("SLURM_JOB_ID", str(os.getppid()))
        for line in preflight(cfg, nnodes=args.nnodes, nproc=args.nproc_per_node, gpus=args.gpus,
                              endpoint=args.rdzv, first=first, job_id=job):
            say(f"megalm preflight: {line}")
    except (ConfigError, PreflightError) as e:
        say(f"megalm preflight: error: {e}")
        if isinstance(e, PreflightError):  # (the config was read: its run dir is known)
            record(cfg, EXIT_USAGE, [f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} preflight: {e}"],
                   False)
        return EXIT_USAGE
    failures = Path(cfg.train.run_dir) / FAILURES_FILE
    for restart in range(cfg.slurm.max_restarts + 1):
        before = failures.stat().st_size if failures.is_file() else 0
        started = time.monotonic()
        torchrun = subprocess.Popen(torchrun_command(args, cfg), start_new_session=True,
                                    preexec_fn=_torchrun_signals)
        while torchrun.poll() is None:
            forwarder.forward(torchrun)
            time.sleep(0.2)
        why = new_lines(failures, before)
        stopped = forwarder.pending or torchrun.returncode == EXIT_STOPPED  # asked to stop: nothing to wait for
        if torchrun.returncode == 0 or stopped or not restartable(args, why) or restart == cfg.slurm.max_restarts:
            break
        say(f"megalm node: {why[0].split(' ', 1)[1] if why else 'a training process died without a word'} "
            f"({time.monotonic() - started:.0f} s in); restarting the ranks from the newest checkpoint "
            f"(restart {restart + 1} of at most {cfg.slurm.max_restarts}, slurm.max_restarts)")
    code = ended(args, cfg, torchrun.returncode, why, before, stopped)
    record(cfg, code, why, bool(stopped))
    return code


def record(cfg, code: int, why: list[str], stopped: bool) -> None:
    """How this node's part of a Slurm job step ended, for the job script to decide whether the
    nodes restart together (megalm/cluster/restart.py); ``why``: its failure lines."""
    from megalm.parallel.distributed import node_name

    step = os.environ.get("MEGALM_STEP")
    if step:
        path = Path(cfg.train.run_dir) / "slurm" / "steps" / step / f"{node_name()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"node": node_name(), "exit_code": code, "why": why, "stopped": stopped}))


def ended(args, cfg, returncode: int, why: list[str], before: int, stopped) -> int:
    """The launcher's last line and exit code when training ended (``why``: its new failure lines)."""
    failures = Path(cfg.train.run_dir) / FAILURES_FILE
    if returncode == 0:
        return 0
    if not why and args.nnodes > 1 and cfg.train.watchdog_timeout_s and not stopped:
        # this node's ranks died without a word: the watchdog on the other nodes names the culprit
        why[:] = await_verdict(failures, before, cfg.train.watchdog_timeout_s + 30)
    if why:
        line = why[0].split(" ", 1)[1]  # after its date
        say(f"megalm node: training failed: {line}")
        return EXIT_WATCHDOG if line.startswith("watchdog:") else EXIT_ERROR
    if stopped:
        say(f"megalm node: training stopped after a signal, with its checkpoint saved; run the same command again "
              f"to resume (exit code {EXIT_STOPPED})")
        return EXIT_STOPPED
    return returncode


def restartable(args, why: list[str]) -> bool:
    """Whether a failed run is worth starting again in place: one node, and no rank's own error
    (only a death without a word, or the watchdog's verdict on one)."""
    return args.nnodes == 1 and all(line.split(" ", 1)[1].startswith("watchdog:") for line in why)


def _torchrun_signals() -> None:
    """In torchrun's process, before it starts: ignore SIGUSR1 (the launcher forwards it), and die
    with the launcher (torchrun is in a session of its own, out of reach of the terminal's signals)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def new_lines(path: Path, before: int) -> list[str]:
    """The lines appended to ``path`` since it had ``before`` bytes."""
    if not path.is_file() or path.stat().st_size <= before:
        return []
    with open(path) as f:
        f.seek(before)
        return f.read().splitlines()


def await_verdict(failures: Path, before: int, wait_s: float) -> list[str]:
    """This node's training failed without a word. Before its failure ends the job (srun
    --kill-on-bad-exit), give the watchdog on the surviving ranks the time to name the rank that
    failed first."""
    say(f"megalm node: training failed on this node; waiting up to {wait_s:.0f} s for the watchdog's verdict")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        lines = new_lines(failures, before)
        if lines:
            return lines
        time.sleep(0.5)
    return []


if __name__ == "__main__":
    exit_now(main())

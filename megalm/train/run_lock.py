"""One run dir, one run: a lock file that names its holder, and takes over from a dead one.

Two runs on one run dir would both resume from the same checkpoint, prune each other's and
interleave ``metrics.jsonl``. Rank 0 of a run creates ``RUN_DIR/run.lock`` (atomically, ``O_EXCL``)
holding its host, pid, the process's start time, the Slurm job and since when, and touches it every
few seconds while the run lives. A second run finds it and is refused with one line naming the
holder, unless the holder is gone:

- the same Slurm job id: the lock is this requeued job's previous incarnation (Slurm ended it);
- the same host: the pid is not running, or runs another program since (its start time differs);
- another host: the lock has not been touched for ``STALE_S`` (that host or its process died).

Then the lock is taken over, and the log says from whom. The lock goes when the run ends, however
it ends: a normal exit, a failure (the watchdog's exit runs it), or the interpreter's exit; so does
a run dir the lock created, if nothing else was written there (a run refused at its start, over
bad input, leaves no empty directory behind).
It is a file, not ``flock``, because run dirs live on shared storage (NFS, Lustre) where ``flock``
is unreliable across hosts.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from megalm.errors import RunLocked
from megalm.parallel.distributed import node_name

log = logging.getLogger("megalm")

LOCK_FILE = "run.lock"
TOUCH_S = 5.0  # how often the holder shows it is alive
STALE_S = 60.0  # a lock of another host untouched this long is a dead run's


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class RunLock:
    """Holds ``run_dir`` for this process (``acquire``), until ``release`` or the process ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._stop = threading.Event()
        self._created: list[Path] = []  # directories that acquiring made, deepest first

    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming the live run that holds it."""
        missing = self.path.parent
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": node_name(), "pid": os.getpid(), "started": _started(os.getpid()),
              "job": os.environ.get("SLURM_JOB_ID", ""),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self._holder()
            why_stale = self._stale(holder, me)
            if why_stale is None:
                raise RunLocked(
                    f"{self.path.parent}: in use by another run: pid {holder['pid']} on {holder['host']}"
                    f"{', Slurm job ' + holder['job'] if holder.get('job') else ''}, since {holder['since']}; "
                    f"wait for it to end or stop it, or choose another train.run_dir (lock: {self.path})") from None
            log.warning("run dir: taking over %s from pid %s on %s (since %s): %s", self.path, holder.get("pid"),
                        holder.get("host"), holder.get("since"), why_stale)
            tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(me))
            os.replace(tmp, self.path)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
        self.held = True
        atexit.register(self.release)
        threading.Thread(target=self._touch, name="megalm-run-lock", daemon=True).start()

    def release(self) -> None:
        """Give the lock back (only if this process holds it: a refused run never removes another's)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        for directory in self._created:
            try:
                directory.rmdir()  # only when empty
            except OSError:
                break

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}  # being written this instant, or torn by a crash: judged by its age
        return {"host": "?", "pid": -1, "job": "", "since": "?", "started": None, **holder}

    def _stale(self, holder: dict, me: dict) -> str | None:
        """Why the holder is gone, or None if it may be alive."""
        if holder["job"] and holder["job"] == me["job"]:
            return f"it is this Slurm job's previous run (job {me['job']}, requeued)"
        if holder["host"] == me["host"]:
            started = _started(int(holder["pid"]))
            if started is None:
                return "that process is not running"
            if holder["started"] is not None and abs(started - holder["started"]) > 1:
                return "that pid now belongs to another process"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "the lock went away meanwhile"
        return f"the lock was last touched {age:.0f} s ago (over {STALE_S:.0f} s)" if age > STALE_S else None

    def _touch(self) -> None:
        while not self._stop.wait(TOUCH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

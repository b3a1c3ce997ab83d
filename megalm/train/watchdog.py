"""Naming the rank that died or hung, instead of letting the others wait in a collective for hours.

Every rank runs a daemon thread that publishes a heartbeat every few seconds: its node, pid, step,
phase, and when its main thread last made progress. The heartbeats go to a small TCP store served
by rank 0's watchdog (its address is passed through torch.distributed's own store). Rank 0's thread
watches every rank; every other rank's watches rank 0 (and the store, which lives in rank 0).

- A heartbeat older than ``train.watchdog_timeout_s``: that rank died (killed, out of memory) or is
  stopped.
- A fresh heartbeat but no progress for the timeout: that rank is stuck (in data loading, in a
  collective). Of several stuck ranks the one furthest behind is named; if all are at the same
  step, every rank is stuck in a collective.

The watcher posts a verdict; every rank polls it, a named rank that can still run prints the stack
of where it hung, and all exit with code 3 within about the timeout, not at the job's time limit.
The verdict is also appended to ``RUN_DIR/watchdog.txt``: the node launcher waits for it before it
lets its node's failure end the job, so the job ends with the culprit named, not with the first
symptom (a collective that failed because a peer vanished).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("megalm")

EXIT_CODE = 3
VERDICT_FILE = "watchdog.txt"  # in the run dir: every verdict, one line each
SOLO_PHASES = ("data",)  # phases a rank runs without waiting for the others
ADDRESS_KEY = "megalm/watchdog/address"


def node_name() -> str:
    """The node's name as the scheduler knows it (Slurm), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _reachable_ip() -> str:
    """This host's address on the interface that reaches the job's store (MASTER_ADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class Watchdog:
    def __init__(self, timeout_s: float, verdict_file: Path):
        self.timeout, self.verdict_file = timeout_s, verdict_file
        self.interval = min(10.0, max(0.5, timeout_s / 10))
        self.step, self.phase, self.progress_at = 0, "starting", time.time()
        self.finished = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Collective: rank 0 opens the heartbeat store, every rank starts its watching thread."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        default = dist.distributed_c10d._get_default_store()
        if self.rank == 0:  # the heartbeat store lives in rank 0's process
            self.server = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=30))
            default.set(ADDRESS_KEY, f"{_reachable_ip()}:{self.server.port}")
        self.address = default.get(ADDRESS_KEY).decode()
        self.progress_at = time.time()
        self._thread = threading.Thread(target=self._run, name="megalm-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int, phase: str) -> None:
        """The main thread is alive and moving: called at every micro-batch and phase change."""
        self.step, self.phase, self.progress_at = step, phase, time.time()

    def diagnose(self) -> None:
        """Training failed (e.g. a collective, because a peer vanished): give the watchdog the time
        to name the culprit (it then ends the process); return if it finds none."""
        if self._thread is not None and self._thread.is_alive():
            print(f"megalm[{self.rank}]: watchdog: training failed; waiting up to {self.timeout:.0f} s to name the rank "
                  f"that failed first", file=sys.stderr, flush=True)
            self._thread.join(timeout=self.timeout + 3 * self.interval)

    def close(self) -> None:
        """Collective: training ended on every rank; every thread stops before rank 0's store goes."""
        if self._thread is None:
            return
        self.finished = True
        dist.barrier()
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 5)
        dist.barrier()

    # ------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        host, port = self.address.rsplit(":", 1)
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(5, self.timeout)))
        except Exception as e:  # noqa: BLE001 - any failure to connect is reported the same way
            self._abort(f"rank {self.rank}: cannot reach the watchdog store of rank 0 at {self.address} ({e})", [])
            return
        me = {"node": node_name(), "pid": os.getpid()}
        seen: dict[int, dict] = {}
        while not self._stop.wait(self.interval if seen else 0):
            try:
                store.set(f"megalm/watchdog/hb/{self.rank}", json.dumps(
                    {**me, "step": self.step, "phase": self.phase, "beat": time.time(),
                     "progress": self.progress_at, "finished": self.finished}))
                if store.check(["megalm/watchdog/abort"]):
                    verdict = json.loads(store.get("megalm/watchdog/abort"))
                    self._abort(verdict["message"], verdict["culprits"])
                    return
                watched = range(self.world) if self.rank == 0 else [0]
                keys = [f"megalm/watchdog/hb/{r}" for r in watched]
                present = [r for r, k in zip(watched, keys) if store.check([k])]
                for r in present:
                    seen[r] = json.loads(store.get(f"megalm/watchdog/hb/{r}"))
            except Exception:  # noqa: BLE001 - the store is in rank 0: losing it means losing rank 0
                if self._stop.is_set():
                    return
                last = seen.get(0, {})
                self._abort(f"lost rank 0 ({last.get('node', '?')}, pid {last.get('pid', '?')}, last at step "
                            f"{last.get('step', '?')}): its watchdog store at {self.address} stopped answering "
                            f"(killed, out of memory, or its node failed)", [0])
                return
            verdict = self._judge(seen, watched)
            if verdict is not None:
                message, culprits = verdict
                store.set("megalm/watchdog/abort", json.dumps({"message": message, "culprits": culprits}))
                with open(self.verdict_file, "a") as f:
                    f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}\n")
                self._abort(message, culprits)
                return

    def _judge(self, seen: dict[int, dict], watched) -> tuple[str, list[int]] | None:
        now = time.time()
        live = {r: hb for r, hb in seen.items() if not hb["finished"]}
        silent = [r for r in watched if r in live and now - live[r]["beat"] > self.timeout]
        if silent:
            r = min(silent, key=lambda r: live[r]["beat"])  # the first to stop
            hb = live[r]
            return (f"rank {r} on {hb['node']} (pid {hb['pid']}) stopped responding at step {hb['step']} "
                    f"({hb['phase']}): no heartbeat for {now - hb['beat']:.0f} s (killed, out of memory, or "
                    f"stopped)", [r])
        if self.rank != 0:
            return None
        # stuck: alive (still beating) but not moving; a rank that also stopped beating is judged
        # above, once its silence reaches the timeout
        stuck = [r for r, hb in live.items() if now - hb["progress"] > self.timeout
                 and now - hb["beat"] <= 3 * self.interval]
        if not stuck:
            return None
        behind = min(live[r]["step"] for r in stuck)
        named = [r for r in stuck if live[r]["step"] == behind]
        # a rank stuck outside collectives (reading data) holds up the ones waiting for it inside one
        named = [r for r in named if live[r]["phase"] in SOLO_PHASES] or named
        if len(named) == len(live) == self.world:
            return (f"every rank is stuck at step {behind} ({live[0]['phase']}) with no progress for "
                    f"{now - max(hb['progress'] for hb in live.values()):.0f} s: a collective hang", named)
        r = named[0]
        hb = live[r]
        return (f"rank {r} on {hb['node']} (pid {hb['pid']}) is stuck at step {hb['step']} in {hb['phase']}: no "
                f"progress for {now - hb['progress']:.0f} s" + (f" (and ranks {named[1:]})" if len(named) > 1 else ""),
                named)

    def _abort(self, message: str, culprits: list[int]) -> None:
        if self.rank in culprits or (not culprits and self.rank == 0):
            print(f"megalm[{self.rank}]: watchdog: this rank is named; where its threads are:", file=sys.stderr)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"megalm[{self.rank}]: watchdog: {message}; ending the run (exit code {EXIT_CODE})", file=sys.stderr,
              flush=True)
        if self.rank == 0:  # the store lives here: let the others read the verdict before it goes
            time.sleep(2 * self.interval)
        logging.shutdown()
        os._exit(EXIT_CODE)

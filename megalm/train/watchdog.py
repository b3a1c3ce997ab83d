"""The first error, first: a rank that fails tells every other rank within a second, and a rank
that died or hung is named instead of leaving the others waiting in a collective for hours.

Every rank runs a daemon thread that talks to a small TCP store served by rank 0's watchdog (its
address is passed through torch.distributed's own store). Twice a second it looks for a failure
posted by any rank; every few seconds it publishes a heartbeat (its node, pid, step, phase, and
when its main thread last made progress).

**A rank fails** (an exception in set-up or training, ``Watchdog.fail``): it prints its own error
at once as one line, then posts it under one key with compare-and-set, so the first failure wins.
Every other rank's thread sees it within half a second, prints ``stopping: rank R ... failed
first: LINE`` as its last line and ends the process; a rank whose own collective broke meanwhile
(because the failed rank left) reads the same record instead of reporting its symptom. Rank 0
hosts the store, so it lets the others read the record (or a few seconds) before it ends. The
first failure is also appended to ``RUN_DIR/failures.txt``, which the node launcher reads, so a
node whose training failed ends at once. All ranks exit with the first failure's exit code. In a
world of one nothing is posted and nothing waits: the exception goes on to the command's handler.

**A rank dies or hangs** (judged only once training runs, ``arm``, and ``train.watchdog_timeout_s``
is not 0):

- a heartbeat older than the timeout: that rank died (killed, out of memory) or is stopped;
- a fresh heartbeat but no progress for the timeout: that rank is stuck (in data loading, in a
  collective). Of several stuck ranks the one furthest behind is named; if all are at the same
  step with no rank failed, every rank is stuck in a collective: a hang.

The verdict is posted like a failure; a named rank that can still run prints the stack of where
it hung, and all exit with code 3. Every heartbeat carries the rank's newest collective
(parallel/collectives.py), so a hang verdict says where each rank waits, and names the rank whose
collective its group's other members are not in (a missing or mismatched collective). With every
verdict, and every failure, each rank writes its last ``train.collectives_kept`` collectives to
``RUN_DIR/collectives/rank-R.json``; with a verdict it also prints its last few. A collective that breaks with no failure posted (a peer was
killed without a word) waits for that verdict, still ending at once on a stop signal.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

from megalm.errors import EXIT_ERROR, EXIT_WATCHDOG, MegalmError, exit_code, exit_now, one_line, prefix, say
from megalm.parallel.collectives import POINT_TO_POINT, RECORDER
from megalm.parallel.distributed import node_name
from megalm.train.preemption import stop_requested

log = logging.getLogger("megalm")

SHOWN = 3  # a rank's newest collectives printed with a verdict
SOLO_PHASES = ("data",)  # phases a rank runs without waiting for the others
TICK_S = 0.5  # how often each rank looks for a posted failure
ACK_WAIT_S = 10.0  # at most this long rank 0 keeps its store up for the others to read a failure (a loaded
# machine's watchdog threads may take seconds); the wait ends as soon as they have
ADDRESS_KEY = "megalm/watchdog/address"
FAILURE_KEY = "megalm/watchdog/failure"
ABORT_KEY = "megalm/watchdog/abort"  # a verdict
# what a broken collective says on each backend: the symptom of a peer's failure, not a cause
COLLECTIVE_SYMPTOMS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "ProcessGroup")


def _reachable_ip() -> str:
    """This host's address on the interface that reaches the job's store (MASTER_ADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def broken_collective(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer went away (a symptom)."""
    return isinstance(e, dist.DistError) or (type(e) is RuntimeError and any(s in str(e) for s in COLLECTIVE_SYMPTOMS))


def describe(failure: dict) -> str:
    """A posted failure in words: who, where, and its own line."""
    return (f"rank {failure['rank']} on {failure['node']} (pid {failure['pid']}) failed first, at step "
            f"{failure['step']} ({failure['phase']}): {failure['line']}")


def waiting_in(live: dict[int, dict]) -> tuple[str, list[int]]:
    """Where stuck ranks wait, from their heartbeats' newest collectives, in words; and the ranks
    whose collective other members of its group are not in (the fewest alike: the odd ones out)."""
    alike: dict[tuple, list[int]] = {}
    for r, hb in sorted(live.items()):
        c = hb.get("collective")
        alike.setdefault((c["what"], c["done"]) if c else ("no collective yet", True), []).append(r)
    if len(alike) == 1:
        (what, done), ranks = next(iter(alike.items()))
        return f"every rank {'last made' if done else 'waits in'} {what}", []
    places = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} "
                       f"{'last made' if done else 'waits in' if len(ranks) == 1 else 'wait in'} {what}"
                       for (what, done), ranks in alike.items())
    disagree = {r for r, hb in live.items() if hb.get("collective") and hb["collective"]["signature"][0] not in
                POINT_TO_POINT and any(
        q in live and (live[q].get("collective") or {}).get("signature") != hb["collective"]["signature"]
        for q in hb["collective"]["members"])}
    if not disagree:
        return places, []
    groups = sorted((ranks for ranks in alike.values() if set(ranks) & disagree), key=len)
    odd = groups[0] if len(groups) > 1 and len(groups[0]) < len(groups[1]) else []
    return (f"{places}: the members of a group are in different collectives (a missing or mismatched collective)"
            + (f", rank {', '.join(map(str, odd))} the odd one out" if odd else ""), odd)


def verdict(message: str, culprits: list[int], silent: bool = False) -> dict:
    """The watchdog's verdict: what it found, the ranks it names, and whether they went silent (dead)."""
    return {"message": message, "culprits": culprits, "silent": silent}


def append_line(path: Path, line: str) -> None:
    """One dated line appended to ``path`` (a run dir's failures file), never raising."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n")
    except OSError as e:  # the disk that failed the run may fail this too: the line is on stderr anyway
        say(f"{prefix()}: cannot record the failure in {path}: {e}")


class Watchdog:
    def __init__(self, timeout_s: float, failures_file: Path):
        self.timeout, self.failures_file = timeout_s, failures_file
        self.interval = min(10.0, max(TICK_S, timeout_s / 10)) if timeout_s else 10.0  # between heartbeats
        self.step, self.phase, self.progress_at = 0, "starting", time.time()
        self.armed = self.finished = False
        self.rank, self.world = 0, 1
        self._stop = threading.Event()
        self._ending = threading.Lock()  # one ending per process: the first to take it speaks
        self._thread: threading.Thread | None = None
        self._client: dist.TCPStore | None = None
        self._cleanups: list[Callable[[], None]] = []

    # ------------------------------------------------------------------------------ the main thread

    def start(self) -> None:
        """Collective: rank 0 opens the store, every rank starts its thread (failures only, until ``arm``)."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world == 1:
            return  # nobody to tell; ``arm`` starts the hang watch if asked
        self._open_store()

    def _open_store(self) -> None:
        default = dist.distributed_c10d._get_default_store()
        if self.rank == 0:  # the store lives in rank 0's process
            self.server = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=30))
            default.set(ADDRESS_KEY, f"{_reachable_ip()}:{self.server.port}")
        self.address = default.get(ADDRESS_KEY).decode()
        self._thread = threading.Thread(target=self._run, name="megalm-watchdog", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        """Training runs: from now on a silent or stuck rank is judged (unless the timeout is 0)."""
        self.progress_at = time.time()
        if self.timeout and self.world == 1 and self._thread is None:
            self._open_store()  # one process can hang too (a stuck read): it is named and ended
        self.armed = bool(self.timeout)

    def progress(self, step: int, phase: str) -> None:
        """The main thread is alive and moving: called at every micro-batch and phase change."""
        self.step, self.phase, self.progress_at = step, phase, time.time()

    def at_exit(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (e.g. release the run dir's lock) also when this watchdog ends the process."""
        self._cleanups.append(cleanup)

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Every exception inside is this rank's failure: told first, on every rank (``fail``)."""
        try:
            yield
        except BaseException as e:
            self.fail(e)
            raise

    def fail(self, e: BaseException) -> None:
        """This rank failed with ``e``. In a world of one, return (the caller re-raises and the
        command prints the line). Otherwise print, post and end the process: never returns."""
        if self.world == 1:
            self._stop.set()  # no verdict on the way out: the command reports the error
            return
        if self._ending.locked():  # the watchdog is ending this process over its verdict: this is a consequence
            self._park()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # a stop signal now ends the process at once
            signal.signal(signum, lambda *_: self._stop_at_once(e))
        if not broken_collective(e):
            if not isinstance(e, (MegalmError, OSError, KeyboardInterrupt)):  # a bug: where it happened matters
                traceback.print_exception(e, file=sys.stderr)
            line = one_line(e)
            say(f"{prefix()}: {line}")
            self._end(self._post({"line": line, "exit_code": exit_code(e)}))
        first = self._read_failure(wait_s=2 * TICK_S)
        if first is not None:
            self._end(first)
        # a collective broke and no rank said why: a peer died without a word, which the
        # watchdog names once its heartbeat is silent for the timeout
        say(f"{prefix()}: {one_line(e)}")
        if stop_requested() or not (self.armed and self._thread is not None and self._thread.is_alive()):
            self._exit(EXIT_ERROR)  # (a launcher that saw the peer die has already asked this rank to stop)
        say(f"{prefix()}: a collective failed and no rank reported an error: a peer died or vanished; waiting up "
              f"to {self.timeout:.0f} s for the watchdog to name it (a stop signal ends this at once)")
        self._thread.join(timeout=self.timeout + 3 * self.interval)
        self._exit(EXIT_ERROR)

    def close(self) -> None:
        """Collective: training ended on every rank; every thread stops before rank 0's store goes."""
        if self._thread is None:
            return
        self.finished = True
        if self.world > 1:
            dist.barrier()
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 5)
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------ failures

    def _store(self) -> dist.TCPStore:
        """This thread's connection to the store (the main thread's; the watchdog thread has its own)."""
        if self.rank == 0:
            return self.server
        if self._client is None:
            host, port = self.address.rsplit(":", 1)
            self._client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
        return self._client

    def _post(self, failure: dict) -> dict:
        """Post this rank's failure unless another came first; the first one, either way."""
        record = json.dumps({"rank": self.rank, "node": node_name(), "pid": os.getpid(), "step": self.step,
                             "phase": self.phase, **failure})
        try:
            first = json.loads(self._store().compare_set(FAILURE_KEY, "", record))
        except Exception as e:  # noqa: BLE001 - rank 0 (the store) is gone: this line is all there is
            say(f"{prefix()}: cannot tell the other ranks (the store in rank 0 is unreachable: {e})")
            return json.loads(record)
        if first["rank"] == self.rank:
            append_line(self.failures_file, describe(first))
        return first

    def _read_failure(self, wait_s: float) -> dict | None:
        """The failure a peer posted, if one is posted within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        try:
            store = self._store()
            while True:
                if store.check([FAILURE_KEY]):
                    return json.loads(store.get(FAILURE_KEY))
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store went with rank 0
            return None

    def _end(self, first: dict, store: dist.TCPStore | None = None) -> None:
        """End this process over the first failure ``first``: say it unless it is ours (already
        said), let the others read it (rank 0 holds the store), exit with its code."""
        if not self._ending.acquire(blocking=False):
            self._park()
        if first["rank"] != self.rank:
            say(f"{prefix()}: stopping because {describe(first)}")
        self._dump(describe(first))
        # the others read the failure from rank 0's store: it waits until they have
        self._acknowledge(FAILURE_KEY, store or self._store, [first["rank"]] if self.rank == 0 else range(self.world))
        self._exit(first["exit_code"])

    def _acknowledge(self, key: str, store, excused) -> None:
        """Say this rank has read ``key``, then wait (a few seconds at most) until every rank but the
        ``excused`` has too; ``store`` may be a function that connects to it."""
        try:
            store = store() if callable(store) else store
            store.set(f"{key}/ack/{self.rank}", "1")
            others = [f"{key}/ack/{r}" for r in range(self.world) if r != self.rank and r not in excused]
            deadline = time.monotonic() + ACK_WAIT_S
            while others and not store.check(others) and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone: nobody is left to wait for
            pass

    def _dump(self, why: str) -> str:
        """This rank's last collectives, written for the record; where they went (or why not)."""
        path = self.failures_file.parent / "collectives" / f"rank-{self.rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rank": self.rank, "node": node_name(), "pid": os.getpid(), "step": self.step,
                                        "phase": self.phase, "why": why, "collectives": RECORDER.dump()}, indent=1))
            return str(path)
        except OSError as e:  # the disk may be what failed: the verdict matters more
            return f"not written: {e}"

    def _exit(self, code: int) -> None:
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - the exit must happen
                pass
        # (not logging.shutdown(): it takes every handler's lock, and this may be the watchdog's thread
        # ending the process while the main thread holds one; megalm's one handler writes to stderr)
        exit_now(code)

    def _stop_at_once(self, e: BaseException) -> None:
        """A stop signal after this rank failed (a launcher ending the rest once the first rank exited):
        end now, but with the first failure's line when a peer posted it (this rank's collective may
        have broken over that peer's exit, and its signal come before it read why)."""
        first = self._read_failure(wait_s=0)
        if first is not None and first["rank"] != self.rank:
            if not self._ending.acquire(blocking=False):
                # another thread is ending this process: go on with what the signal interrupted, which
                # may hold a lock that thread needs on its way out (stderr's, a log handler's): parked
                # here, it would hold it for good, and torchrun kills a worker that outlives its
                # SIGTERM only 30 s later
                return
            say(f"{prefix()}: stopping because {describe(first)}")
        self._exit(first["exit_code"] if first is not None else exit_code(e))

    def _park(self) -> None:
        """Another thread of this process is ending it: wait for that."""
        while True:
            time.sleep(1)

    # ------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        host, port = self.address.rsplit(":", 1)
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(5, self.timeout)))
        except Exception as e:  # noqa: BLE001 - any failure to connect is reported the same way
            self._abort(verdict(f"rank {self.rank}: cannot reach the watchdog store of rank 0 at {self.address} ({e})",
                                []), None)
            return
        me = {"node": node_name(), "pid": os.getpid()}
        seen: dict[int, dict] = {}
        watched = range(self.world) if self.rank == 0 else [0]
        next_beat = 0.0
        while not self._stop.wait(TICK_S):
            try:
                if store.check([FAILURE_KEY]):
                    self._end(json.loads(store.get(FAILURE_KEY)), store)
                if store.check([ABORT_KEY]):
                    self._abort(json.loads(store.get(ABORT_KEY)), store)
                if time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + self.interval
                last = RECORDER.last()
                store.set(f"megalm/watchdog/hb/{self.rank}", json.dumps(
                    {**me, "step": self.step, "phase": self.phase, "beat": time.time(),
                     "progress": self.progress_at, "finished": self.finished, "armed": self.armed,
                     "collective": last and {"what": last.what(), "signature": last.signature(),
                                             "members": last.members, "done": last.duration_s is not None}}))
                for r in watched:
                    if store.check([f"megalm/watchdog/hb/{r}"]):
                        seen[r] = json.loads(store.get(f"megalm/watchdog/hb/{r}"))
            except Exception:  # noqa: BLE001 - the store is in rank 0: losing it means losing rank 0
                if self._stop.is_set():
                    return
                last = seen.get(0, {})
                self._abort(verdict(f"lost rank 0 ({last.get('node', '?')}, pid {last.get('pid', '?')}, last at step "
                                    f"{last.get('step', '?')}): its watchdog store at {self.address} stopped "
                                    f"answering (killed, out of memory, or its node failed)", [0], silent=True), None)
            judged = self._judge(seen, watched) if self.armed else None
            if judged is not None:
                posted = json.dumps(judged)
                if store.compare_set(ABORT_KEY, "", posted).decode() == posted:  # the first verdict is recorded
                    append_line(self.failures_file, f"watchdog: {judged['message']}")
                self._abort(judged, store)

    def _judge(self, seen: dict[int, dict], watched) -> dict | None:
        now = time.time()
        live = {r: hb for r, hb in seen.items() if not hb["finished"]}
        silent = [r for r in watched if r in live and now - live[r]["beat"] > self.timeout]
        if silent:
            r = min(silent, key=lambda r: live[r]["beat"])  # the first to stop
            hb = live[r]
            return verdict(f"rank {r} on {hb['node']} (pid {hb['pid']}) stopped responding at step {hb['step']} "
                           f"({hb['phase']}): no heartbeat for {now - hb['beat']:.0f} s (killed, out of memory, or "
                           f"stopped)", [r], silent=True)
        if self.rank != 0:
            return None
        # stuck: alive (still beating) but not moving; a rank that also stopped beating is judged
        # above, once its silence reaches the timeout. Only a training rank (armed) can be stuck: one
        # still setting up (a loaded host, a large checkpoint to read) is not, though its start is
        # long ago; once training ranks have waited the timeout for it, it is the one named.
        stuck = [r for r, hb in live.items() if hb["armed"] and now - hb["progress"] > self.timeout
                 and now - hb["beat"] <= 3 * self.interval]
        if not stuck:
            return None
        setting_up = [r for r, hb in live.items() if not hb["armed"]]
        if setting_up:
            r, hb = setting_up[0], live[setting_up[0]]
            waited = now - max(live[s]["progress"] for s in stuck)
            others = f" (and ranks {setting_up[1:]})" if len(setting_up) > 1 else ""
            return verdict(f"rank {r} on {hb['node']} (pid {hb['pid']}) is still setting up, "
                           f"{now - hb['progress']:.0f} s after it started, while the others have waited "
                           f"{waited:.0f} s for it to train{others}", setting_up)
        behind = min(live[r]["step"] for r in stuck)
        named = [r for r in stuck if live[r]["step"] == behind]
        # a rank stuck outside collectives (reading data) holds up the ones waiting for it inside one
        named = [r for r in named if live[r]["phase"] in SOLO_PHASES] or named
        if len(named) == len(live) == self.world > 1:
            where, odd = waiting_in(live)
            return verdict(f"every rank is stuck at step {behind} ({live[0]['phase']}) with no progress for "
                           f"{now - max(hb['progress'] for hb in live.values()):.0f} s: a collective hang; {where}",
                           odd or named)
        r = named[0]
        hb = live[r]
        return verdict(f"rank {r} on {hb['node']} (pid {hb['pid']}) is stuck at step {hb['step']} in {hb['phase']}: "
                       f"no progress for {now - hb['progress']:.0f} s" +
                       (f" (and ranks {named[1:]})" if len(named) > 1 else ""), named)

    def _abort(self, verdict: dict, store: dist.TCPStore | None) -> None:
        """End this process over the watchdog's verdict (exit code 3)."""
        if not self._ending.acquire(blocking=False):
            self._park()
        message, culprits = verdict["message"], verdict["culprits"]
        if self.rank in culprits or (not culprits and self.rank == 0):
            say(f"{prefix()}: watchdog: this rank is named; where its threads are:")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        dumped = self._dump(f"watchdog: {message}")
        newest = list(RECORDER.entries)[-SHOWN:]
        say(f"{prefix()}: its newest collectives ({dumped}): " + "; ".join(f"#{e.seq} step {e.step} {e.describe()}"
                                                                         for e in newest) if newest else
            f"{prefix()}: no collective on record")
        say(f"{prefix()}: watchdog: {message}; ending the run (exit code {EXIT_WATCHDOG})")
        if store is not None:  # every rank shows its collectives before any leaves (a launcher stops them all
            # when one process ends); a dead rank is not waited for
            self._acknowledge(ABORT_KEY, store, culprits if verdict["silent"] else [])
        self._exit(EXIT_WATCHDOG)

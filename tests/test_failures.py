"""How a run ends when something goes wrong, as a user meets it: through ``megalm train`` and the
node launcher (``launch/train.sh``) with default settings (the watchdog on, at its 600 s), checking
the line shown, the exit code, the seconds from the error to the exit, and that nothing was lost.
(The 2-node Slurm case is in test_slurm.py; bad input outside training in test_bad_inputs.py.)"""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megalm.checkpoint import catalog
from megalm.errors import EXIT_INTERRUPTED, EXIT_STOPPED
from megalm.train.preemption import StopFlag
from tests.helpers import CONFIG, REPO, TINY, Watched, denied, launcher, megalm_cmd, metrics, run_megalm, wait_for_steps

LONG = ["train.steps=100000", "train.eval_every=100000", "train.log_every=1"]
def snapshot(folder) -> dict:
    """Every file under ``folder`` with its size and modification time: to show nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_to_exit(run: Watched, text: str) -> float:
    """Seconds from the first line naming the error to the end of the command."""
    return run.ended - run.at(text)


def test_errors_in_one_process_end_it_at_once(data_dir, data_args, single_run, tmp_path):
    """A truncated, deleted or corrupt train shard, and a checkpoint write that fails: the error's
    own line, exit 1, within 5 s of the error, with the watchdog at its default; nothing saved."""
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    first = sorted(bad.glob("train-*.tar"))  # every rank of a one-process run reads every lane's first shard
    cases = {
        "truncated": (lambda p: os.truncate(p, 5000), "holds 5000 bytes, index.json says"),
        "deleted": (lambda p: p.unlink(), "missing (no such file)"),
        "flipped": (lambda p: p.write_bytes(_flip(p.read_bytes())), "differs from index.json's"),
    }
    for name, (damage, says) in cases.items():
        shutil.rmtree(bad)
        shutil.copytree(data_dir, bad)
        for shard in first:  # all of them: whichever a lane opens first is damaged
            damage(shard)
        before = snapshot(bad)
        run_dir = tmp_path / name
        run = Watched(megalm_cmd("train", CONFIG, *TINY, *data_args, f"data.dir={bad}",
                                 f"train.run_dir={run_dir}")).end()
        assert run.proc.returncode == 1, (name, run.stderr[-3000:])
        line = run.stderr.strip().splitlines()[-1]
        assert line.startswith(f"megalm: error: shard {bad}/train-") and says in line, (name, line)
        assert "restore it, re-run `megalm prepare`" in line and "Traceback" not in run.stderr
        assert error_to_exit(run, "megalm: error: shard") <= 5, (name, run.ended, run.lines[-3:])
        assert "watchdog" not in run.stderr  # no false hang, no waiting
        assert snapshot(bad) == before and not (run_dir / "checkpoints").exists()
        print(f"\n{name} shard, 1 process: {error_to_exit(run, 'megalm: error: shard'):.2f} s from the error to "
              f"the exit ({run.ended:.1f} s in all)")

    # a checkpoint write that fails (a file-size limit, as `ulimit -f`): the save's own line
    run_dir = tmp_path / "fsize"
    limit = 200_000  # above the run dir's small files, below a checkpoint's fragments (~1.6 MB)
    run = Watched(megalm_cmd("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.save_every=2"),
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))).end()
    assert run.proc.returncode == 1, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line == "megalm: error: saving step_00000002 failed on rank 0: OSError: [Errno 27] File too large", line
    assert error_to_exit(run, "saving step_00000002 failed") <= 5
    assert not (run_dir / "checkpoints/latest").exists() and catalog.complete_checkpoints(run_dir / "checkpoints") == []
    assert not (run_dir / "run.lock").exists()  # the run dir is free again
    print(f"checkpoint write, 1 process: {error_to_exit(run, 'saving step_00000002 failed'):.2f} s")


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


# (rank 1 of 2, on another node: tests/test_slurm.py, test_an_error_on_one_node_ends_the_job_within_seconds)
@pytest.mark.parametrize("nproc,rank", [(2, 0), (4, 2)])
def test_the_first_error_reaches_every_rank_within_seconds(small_shards, tmp_path, nproc, rank):
    """Under the node launcher, rank ``rank``'s storage refuses a shard mid-training while the
    others wait in a collective: it prints the storage's own message, every other rank's last line
    names it, the launcher's last line too, and all end within 15 s of it (watchdog at 600 s)."""
    overrides, extra = denied(small_shards, rank, after=2)
    run_dir = tmp_path / "run"
    run = launcher(CONFIG, *TINY, *LONG, *overrides, f"train.run_dir={run_dir}", f"train.global_batch={2 * nproc}",
                   "train.micro_batch_size=2", nproc=nproc, extra_env=extra).end()
    assert run.proc.returncode == 1 and f"megalm[{rank}]: error:" in run.stderr, run.stderr[-4000:]
    origin = run.last(f"megalm[{rank}]: ")
    assert origin.startswith(f"megalm[{rank}]: error: shard pipe:") and \
        "the command exited with 3: storage: access denied to train-" in origin, origin
    failed = origin.split(": ", 1)[1]  # "error: shard ...": what the others' lines end with
    for other in set(range(nproc)) - {rank}:
        last = run.last(f"megalm[{other}]: ")
        assert last.startswith(f"megalm[{other}]: stopping because rank {rank} on ") and last.endswith(failed), last
    node = run.stderr.strip().splitlines()[-1]
    assert node.startswith(f"megalm node: training failed: rank {rank} on ") and node.endswith(failed), node
    assert "(pid " in node and "failed first, at step " in node
    step = int(node.split("at step ")[1].split()[0])
    assert step > 0  # mid-training: the others were in a collective
    assert "watchdog" not in run.stderr and "Traceback" not in run.stderr
    assert "restarting the ranks" not in run.stderr  # a rank's own error would only recur
    took = error_to_exit(run, "storage: access denied")
    timeline = "\n".join(f"{t:7.2f} {line[:200]}" for t, line in run.lines if t >= run.at("storage: access denied") - 1)
    assert took <= 15, f"{took:.1f} s from the error to the exit:\n" + timeline
    assert (run_dir / "failures.txt").read_text().count("failed first") == 1
    print(f"\n{nproc} processes, rank {rank} failed at step {step}: {took:.2f} s from its error to the launcher's exit")


STOP_WHILE_ENDING = """
import logging, os, signal, sys, threading, time
from pathlib import Path
from megalm.train.watchdog import Watchdog

watchdog = Watchdog(600, Path(sys.argv[1]))
watchdog._read_failure = lambda wait_s: {"rank": 1, "node": "n", "pid": 1, "step": 8, "phase": "data",
                                         "line": "error: x", "exit_code": 1}  # a peer failed first
signal.signal(signal.SIGTERM, lambda *_: watchdog._stop_at_once(RuntimeError("collective broke")))
watchdog._ending.acquire()  # the watchdog's thread is ending this process over that failure


class SlowHandler(logging.Handler):  # the main thread is writing a log line when the launcher's SIGTERM comes
    def emit(self, record):
        time.sleep(10)


logging.getLogger().addHandler(SlowHandler())
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
threading.Timer(0.6, watchdog._exit, (1,)).start()
print(time.time(), file=sys.stderr, flush=True)
logging.getLogger().warning("step 8")
os._exit(9)  # (not reached when the watchdog's thread ends the process)
"""


def test_a_stop_signal_while_another_thread_ends_the_process_does_not_hold_it_up(tmp_path):
    """torchrun sends SIGTERM to the ranks still running once the first exits: one whose watchdog
    thread is already ending it over a peer's failure exits at once, even when the signal interrupted
    its main thread inside a log handler (whose lock the exit must not wait for)."""
    script = tmp_path / "stop.py"
    script.write_text(STOP_WHILE_ENDING)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "failures.txt")], cwd=REPO, timeout=30,
                          capture_output=True, text=True)
    took = time.time() - float(proc.stderr.split()[0])  # from the log line's start (the handler takes 10 s)
    assert proc.returncode == 1 and took < 5, (took, proc.returncode, proc.stderr[-2000:])


def test_signals_save_and_stop_with_exit_75_then_resume(data_args, tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM in one process, and Ctrl-C to the node launcher of 2 processes:
    each saves at the step it reached and exits 75 (stopped; run again to resume) without a
    traceback; the same command then resumes from there, and the steps join up."""
    run_dir = tmp_path / "run"
    args = [CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.steps=100000", "train.eval_every=100000"]
    for signum in (signal.SIGINT, signal.SIGTERM):
        start = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_")) if signum == signal.SIGTERM else 0
        run = Watched(megalm_cmd("train", *args))
        wait_for_steps(run, run_dir, start + 3)
        run.signal(signum)
        run.end()
        name = signal.Signals(signum).name
        assert run.proc.returncode == EXIT_STOPPED, (name, run.stderr[-3000:])
        assert f"received {name}: will checkpoint and stop after this step" in run.stderr
        assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
        stopped = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
        assert run.stderr.strip().splitlines()[-1].startswith(f"megalm: stopped at step {stopped} ")
        assert "run the same command again to resume (exit code 75)" in run.stderr
        assert metrics(run_dir)[-1]["step"] == stopped  # no evaluation on the way out: a stop is urgent
        print(f"\n{name}: saved step {stopped}, exit 75 {run.ended - run.at(f'received {name}'):.1f} s after it")
    # the node launcher: Ctrl-C reaches its process group (as from a terminal); every rank saves
    run = launcher(*args, "train.global_batch=4", "train.micro_batch_size=2", nproc=2)
    run.wait_for("megalm[0]: train: ")
    wait_for_steps(run, run_dir, stopped + 3)
    run.signal(signal.SIGINT)
    run.end()
    assert run.proc.returncode == EXIT_STOPPED, run.stderr[-4000:]
    assert "megalm[0]: received SIGINT" in run.stderr and "megalm[1]: received SIGINT" in run.stderr
    assert run.stderr.count("got SIGINT; passing it to the training processes") == 1
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == ("megalm node: training stopped after a signal, with its checkpoint "
                                                   "saved; run the same command again to resume (exit code 75)")
    last = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    assert last > stopped
    catalog.verify(run_dir / "checkpoints" / catalog.tag(last))
    # resume to the end: every step once
    finished = run_megalm("train", *args[:-2], f"train.steps={last + 2}", "train.eval_every=100000")
    assert f"from step {last}" in finished.stderr
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, last + 3))


def test_a_second_ctrl_c_stops_at_once():
    flag = StopFlag()
    flag._handle(signal.SIGINT, None)
    assert flag.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)
    assert EXIT_INTERRUPTED == 130
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def test_one_run_dir_one_run(data_args, tmp_path):
    """A second run on a run dir that a live run holds is refused, naming the holder; once the
    holder is killed (-9), its lock is stale and the next run takes it over and resumes."""
    run_dir = tmp_path / "run"
    args = [CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", *LONG, "train.save_every=2"]
    holder = Watched(megalm_cmd("train", *args))
    try:
        holder.wait_for("checkpoint step_00000002")
        second = Watched(megalm_cmd("train", *args)).end()
        assert second.proc.returncode == 1
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"megalm: error: {run_dir}: in use by another run: pid {holder.proc.pid} on "), line
        assert ", since 20" in line and "choose another train.run_dir" in line
        assert second.ended < 30 and holder.proc.poll() is None  # refused before it touched anything
        wait_for_steps(holder, run_dir, max(r["step"] for r in metrics(run_dir)) + 3)  # the holder trains on
    finally:
        holder.kill()
        holder.end()
    latest = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    taken = run_megalm("train", *args[:-len(LONG) - 1], f"train.steps={latest + 2}", "train.eval_every=100000")
    assert f"run dir: taking over {run_dir / 'run.lock'} from pid {holder.proc.pid}" in taken.stderr
    assert "that process is not running" in taken.stderr and f"from step {latest}" in taken.stderr
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps[-2:] == [latest + 1, latest + 2] and len(steps) == len(set(steps))
    assert not (run_dir / "run.lock").exists()


def test_a_peer_killed_without_a_word_waits_for_the_watchdog_but_a_stop_signal_ends_it(data_args, tmp_path):
    """Two ranks started by hand (no torchrun to clean up): rank 1 is killed (-9). Rank 0's
    collective breaks with no failure posted, so it waits for the watchdog to name the dead rank
    (600 s by default), saying so; a SIGTERM then ends it at once, as Slurm's would."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    ranks = [Watched(megalm_cmd("train", CONFIG, *TINY, *data_args, *LONG, f"train.run_dir={run_dir}",
                                "train.micro_batch_size=2"),
                     extra_env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": str(port)}) for r in (0, 1)]
    wait_for_steps(ranks[0], run_dir, 3)
    ranks[1].kill()
    waiting = ranks[0].wait_for("no rank reported an error: a peer died or vanished", timeout=30)
    broke = ranks[0].last("megalm[0]: error: RuntimeError: ")  # gloo's own words: closed, or reset, by peer
    assert "by peer" in broke and "gloo" in broke, broke
    ranks[0].signal(signal.SIGTERM)
    ranks[0].end(timeout=30)
    assert ranks[0].proc.returncode == 1 and ranks[0].ended - waiting < 5, (ranks[0].ended, waiting)
    assert not (run_dir / "run.lock").exists()

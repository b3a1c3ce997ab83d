"""Slurm for real: a two-node test cluster on this machine (slurm/testcluster/), jobs submitted with
`megalm slurm submit`, one CPU rank per node over gloo. The time limit's signal makes every rank
save, the job requeues itself and resumes on the uninterrupted loss curve; a killed rank and a
stopped rank end the job within the watchdog's timeout, named."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megalm.checkpoint import catalog
from megalm.checkpoint.meta import CheckpointMeta, Layout
from megalm.cluster import requeue, restart
from megalm.config import load_config
from tests.helpers import CONFIG, REPO, TINY, denied, env, metrics, torchrun

START, STOP = REPO / "slurm/testcluster/start.sh", REPO / "slurm/testcluster/stop.sh"
LONG = ["train.steps=100000", "train.eval_every=100000", "train.log_every=1", "train.global_batch=4",
        "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment that reaches the test cluster (started here, stopped after the module)."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (it installs and runs slurmctld, slurmd and munge)")
    state = tmp_path_factory.mktemp("slurm")
    e = {**env(), "MEGALM_SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf"),
         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the jobs' python3 is this one
    subprocess.run(["bash", str(START), "3"], env=e, check=True, timeout=300)  # (the third: a spare)
    yield e
    subprocess.run(["bash", str(STOP)], env=e, timeout=120)


def submit(e: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "slurm", "submit", *args], env=e, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def running(e: dict, job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], env=e, capture_output=True, text=True).stdout
    return bool(out.strip())


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - start


def job_log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r] if (run_dir / "metrics.jsonl").is_file() else []


def gone(pid: int) -> bool:
    """The process has ended: no such pid, or a zombie (dead, its exit status not yet collected by
    the job step that started it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def job_processes(job: str, node: str) -> list[psutil.Process]:
    """The megalm processes of a job on one node (its launcher, torchrun, ranks), whoever their parent."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd, environ = " ".join(p.info["cmdline"] or []), p.environ()
        except psutil.Error:
            continue
        if "megalm" in cmd and environ.get("SLURM_JOB_ID") == job and environ.get("SLURMD_NODENAME") == node:
            found.append(p)
    return found


def rank_process(job: str, rank: int) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd, environ = " ".join(p.info["cmdline"] or []), p.environ()
        except psutil.Error:
            continue
        if "megalm.cli train" in cmd and "torch.distributed.run" not in cmd and environ.get("RANK") == str(rank) \
                and environ.get("SLURM_JOB_ID") == job:
            return p
    raise AssertionError(f"no rank {rank} of job {job}")


@pytest.mark.slow
def test_time_limit_saves_requeues_and_resumes_on_the_same_curve(slurm, data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = [CONFIG, *TINY, *data_args, *LONG, f"train.run_dir={run_dir}", "slurm.signal_lead_s=55"]
    started = time.monotonic()
    # each step made to take 0.1 s longer, so that waiting for the time limit leaves the CPU to the other tests
    idle = {"MEGALM_FAULTS": "slow=0.1@1-100000"}
    job = submit({**slurm, **idle}, *args, "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--time", "1")
    # the time limit's signal comes 5-35 s in (Slurm checks every 30 s): every rank saves, the job
    # requeues itself. The requeued job gets a longer limit (this Slurm signals a requeued
    # one-minute job again within seconds), resumes, and goes on until it is cancelled.
    wait_until(lambda: "requeueing to resume" in job_log(run_dir), 150, "the time limit to requeue the job")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env=slurm, check=True)
    wait_until(lambda: "(requeue 1)" in job_log(run_dir) and "resume: from" in job_log(run_dir).split("(requeue 1)")[1],
               120, "the requeued job to resume")
    resumed = int(re.search(r"resume: from \S+step_(\d+)", job_log(run_dir)).group(1))
    wait_until(lambda: len(steps_logged(run_dir)) >= resumed + 10, 60, "steps after the resume")
    subprocess.run(["scancel", job], env=slurm, check=True)  # TERM: every rank saves, no requeue
    wait_until(lambda: not running(slurm, job), 90, "the cancelled job to end")
    wall = time.monotonic() - started
    log = job_log(run_dir)
    first_job = log.split("(requeue 1)")[0]
    assert "USR1 (time limit near, or preemption)" in first_job and "requeueing to resume" in first_job
    assert f"stopped at step {resumed} of 100000 after a signal" in first_job
    assert "TERM (cancelled): every rank saves and stops" in log and "(requeue 2)" not in log
    final = catalog.newest_first(catalog.checkpoint_root(run_dir))[0]
    last = int(final.name.removeprefix("step_"))
    assert last > resumed + 5, "the cancel's save"
    reference = tmp_path / "reference"
    torchrun(2, "train", *args, f"train.run_dir={reference}", f"train.stop_at={last}")
    ours = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    theirs = {r["step"]: r for r in metrics(reference) if "loss" in r}
    assert sorted(ours) == sorted(theirs) == list(range(1, last + 1))
    for step in theirs:  # across the requeue, bit for bit: same weights, same batches
        assert (ours[step]["loss"], ours[step]["data_hash"]) == (theirs[step]["loss"], theirs[step]["data_hash"]), step
    print(f"\nrequeue test: stopped at step {resumed}, resumed, cancelled at step {last}; {wall:.0f} s")
    print(log[-3000:])


@pytest.mark.slow
def test_a_killed_node_is_replaced_by_a_spare_and_a_stopped_rank_named(slurm, data_args, tmp_path):
    """Two jobs at once. Of the first, with a spare node, node2 is killed (its launcher, torchrun and
    rank, SIGKILL): the job starts its step again on node1 and the spare node3, from the newest
    checkpoint, and the run finishes. Rank 1 of the other is stopped (SIGSTOP), with no restart
    left (slurm.max_restarts=0): the watchdog names it and the job ends."""
    kill_dir, stop_dir = tmp_path / "kill", tmp_path / "stop"
    common = [CONFIG, *TINY, *data_args, *LONG, "train.watchdog_timeout_s=8", "slurm.max_requeues=0", "--nodes", "2",
              "--gpus-per-node", "1", "--cpu", "--time", "10"]
    kill_job = submit(slurm, *common, f"train.run_dir={kill_dir}", "train.steps=100", "train.save_every=20",
                      "--spare-nodes", "1")
    stop_job = submit(slurm, *common, f"train.run_dir={stop_dir}", "slurm.max_restarts=0")
    # one job at a time: the first may finish before the second is under way
    wait_until(lambda: len(steps_logged(kill_dir)) >= 20, 120, "the first job to train")
    tree = []  # node2's launcher, torchrun and rank (whoever their parent), all three seen at once

    def whole_tree() -> bool:
        tree[:] = job_processes(kill_job, "node2")
        modules = {cmd[cmd.index("-m") + 1] for p in tree if "-m" in (cmd := p.info["cmdline"] or [])}
        return {"megalm.cluster.node", "megalm.cluster.torchrun", "megalm.cli"} <= modules
    wait_until(whole_tree, 30, "node2's launcher, torchrun and rank")
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):  # (a short-lived child may be gone already)
            p.kill()
    killed_at = max(steps_logged(kill_dir))
    wait_until(lambda: len(steps_logged(stop_dir)) >= 30, 120, "the second job to train")
    victim = rank_process(stop_job, 1)
    hit = time.monotonic()
    victim.suspend()

    wait_until(lambda: not running(slurm, stop_job), 120, "the stopped job to end")
    ended_after = time.monotonic() - hit
    log = job_log(stop_dir)
    named = re.search(r"watchdog: rank 1 on node\d \(pid (\d+)\) stopped responding at step (\d+)", log)
    assert named and int(named.group(1)) == victim.pid, log[-3000:]
    assert 0 < int(named.group(2)) <= max(steps_logged(stop_dir))  # its last heartbeat's step
    assert "not restarting: 0 restarts in this job already (slurm.max_restarts)" in log
    assert "not requeueing" in log and "slurm.max_requeues=0" in log
    assert ended_after < 8 + 30, ended_after  # the watchdog's timeout, its interval and the job's teardown
    assert gone(victim.pid), "the stopped rank was left behind"
    assert "watchdog: rank 1 on node" in (stop_dir / "failures.txt").read_text()
    assert "megalm node: training failed: watchdog: rank 1 on node" in log

    wait_until(lambda: not running(slurm, kill_job), 180, "the job with a killed node to finish")
    log = job_log(kill_dir)
    assert killed_at < 100, killed_at  # mid-run
    assert ("megalm job: restarting on node1,node3 from the newest checkpoint (restart 1 of at most 3, "
            "slurm.max_restarts); node2: its launcher never reported back (the node or its processes died); left "
            "out, the spare node3 takes its place") in log, log[-4000:]
    again = log.split("megalm job: restarting on node1,node3")[1]
    assert f"step {kill_job}.1 on node1,node3" in again and "resume: from " in again
    assert "finished: the newest checkpoint is at step 100 of 100" in log
    assert steps_logged(kill_dir)[-1] == 100 and sorted(set(steps_logged(kill_dir))) == list(range(1, 101))
    print(f"\nstop: the job ended {ended_after:.0f} s after its rank 1 was stopped; kill: node2 replaced, finished")


@pytest.mark.slow
def test_an_error_on_one_node_ends_the_job_within_seconds(slurm, small_shards, tmp_path):
    """Rank 1's storage refuses a shard mid-training (the watchdog at its default 600 s): its line,
    then every rank's and every node's last line name it, and the job ends within 15 s of it."""
    run_dir = tmp_path / "run"
    overrides, extra = denied(small_shards, rank=1, after=2)
    job = submit({**slurm, **extra}, CONFIG, *TINY, *LONG, *overrides, f"train.run_dir={run_dir}",
                 "slurm.max_requeues=0", "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--time", "10")
    failed = wait_until(lambda: "megalm[1]: error: shard pipe:" in job_log(run_dir), 180, "rank 1's error")
    ended = wait_until(lambda: not running(slurm, job), 60, "the job to end")
    log = job_log(run_dir)
    origin = next(line for line in log.splitlines() if line.startswith("megalm[1]: error: shard pipe:"))
    assert "the command exited with 3: storage: access denied to train-" in origin and "for rank 1" in origin
    said = origin.split(": ", 1)[1]
    last0 = [line for line in log.splitlines() if line.startswith("megalm[0]: ")][-1]
    assert last0.startswith("megalm[0]: stopping because rank 1 on node2 (pid ") and last0.endswith(said), last0
    nodes = [line for line in log.splitlines() if line.startswith("megalm node: training failed:")]
    assert nodes and all(line.endswith(said) and "rank 1 on node2" in line for line in nodes), nodes
    assert "watchdog:" not in log and "not requeueing" in log
    assert ended <= 15, ended
    print(f"\n2-node Slurm job: ended {ended:.1f} s after rank 1's error appeared in its log ({failed:.0f} s in)")


def test_requeue_decisions(tmp_path):
    """Finished: no requeue; stopped early: requeue; stuck at one step: give up after max_requeues."""
    run_dir = tmp_path / "run"
    root = catalog.checkpoint_root(run_dir)

    def at(step: int) -> None:
        (root / catalog.tag(step)).mkdir(parents=True)
        CheckpointMeta(step=step, layout=Layout(1, 1, 1, 0), config={}, state={}, optimizer=True, tokenizer_sha256="",
                       files={}, versions={}, git_commit="", created_utc="").write(root / catalog.tag(step))
        (root / catalog.LATEST).write_text(catalog.tag(step))

    args = [str(REPO / CONFIG), f"train.run_dir={run_dir}", "train.steps=50", "slurm.max_requeues=2"]
    at(10)
    assert requeue.decide(args[0], args[1:], 0, "1")[0] is True
    assert requeue.decide(args[0], args[1:], 1, "2")[0] is True
    again, why = requeue.decide(args[0], args[1:], 1, "3")
    assert again is False and "3 times in a row" in why
    at(20)  # progress: the count starts over
    assert requeue.decide(args[0], args[1:], 0, "4")[0] is True
    again, why = requeue.decide(args[0], args[1:], 2, "5")  # a config error is not requeued
    assert again is False and "config or usage error (exit code 2)" in why
    at(50)
    again, why = requeue.decide(args[0], args[1:], 0, "5")
    assert again is False and why.startswith("finished")


def test_restart_decisions(tmp_path):
    """A node that never reported is replaced by a spare while one is left, else used again; a node
    the watchdog named likewise; a rank's own error, a stop and the restart cap end the restarts."""
    run_dir = tmp_path / "run"
    cfg = load_config(str(REPO / CONFIG), [f"train.run_dir={run_dir}", "slurm.max_restarts=2"])
    verdict = "2026-12-03T16:00:00+00:00 watchdog: rank 3 on n2 (pid 77) stopped responding at step 9 (...)"

    def ended(step: str, node: str, *why: str, code: int = 3) -> None:
        folder = restart.step_dir(run_dir, step)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{node}.json").write_text(json.dumps({"node": node, "exit_code": code, "why": list(why)}))

    nodes, allocation = ["n1", "n2"], ["n1", "n2", "n3"]
    ended("7.0", "n1")  # n2 never reported
    following, left_out, why = restart.decide(cfg, "7.0", 137, 0, nodes, allocation, [])
    assert (following, left_out) == (["n1", "n3"], ["n2"]), why
    assert why.endswith("(restart 1 of at most 2, slurm.max_restarts); n2: its launcher never reported back (the "
                        "node or its processes died); left out, the spare n3 takes its place")
    ended("7.1", "n1", verdict.replace("n2", "n3"))
    ended("7.1", "n3", verdict.replace("n2", "n3"))  # named by the watchdog, and no spare left
    following, left_out, why = restart.decide(cfg, "7.1", 3, 1, ["n1", "n3"], allocation, ["n2"])
    assert (following, left_out) == (["n1", "n3"], ["n2"]) and "n3: the watchdog named it; no spare node left" in why
    assert restart.decide(cfg, "7.1", 3, 2, ["n1", "n3"], allocation, ["n2"])[2] == \
        "not restarting: 2 restarts in this job already (slurm.max_restarts)"
    ended("8.0", "n1", "2026-12-03T16:00:00+00:00 shard pipe: ...", code=1)
    ended("8.0", "n2", code=1)
    assert restart.decide(cfg, "8.0", 1, 0, nodes, allocation, [])[2] == \
        "not restarting: a rank's own error would happen again: shard pipe: ..."
    ended("9.0", "n1", code=75)
    ended("9.0", "n2", code=75)
    assert restart.decide(cfg, "9.0", 75, 0, nodes, allocation, [])[0] is None  # stopped by a signal


def node_launcher(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalm.cluster.node", *args], cwd=REPO, capture_output=True,
                          text=True, env={**env(), **(extra_env or {})}, timeout=120)


def test_preflight_fails_early_with_the_reason(data_args, tmp_path):
    base = [CONFIG, *TINY, *data_args, f"train.run_dir={tmp_path / 'run'}", "slurm.rdzv_wait_s=2"]
    cases = [
        (["--nproc-per-node", "3", "parallel.tp=2"], {}, "1 nodes x 3 processes = 3: parallel: tp=2 x pp=1 does not "
                                                          "divide the 3 processes started"),
        (["--nproc-per-node", "1", "--gpus"], {}, "has 0 GPUs, the job starts 1 processes per node"),
        (["--nproc-per-node", "1", "--nnodes", "2", "data.dir=/nonexistent/data"], {"SLURMD_NODENAME": "node2"},
         "data.dir /nonexistent/data: no index.json on node2; prepare it first"),
        (["--nproc-per-node", "1", "--nnodes", "2"], {"SLURMD_NODENAME": "node2", "SLURM_JOB_ID": "77"},
         "sees the marks of ['node2'] only, not of all 2 nodes: the run dir must be on storage every node shares"),
    ]
    for args, extra, message in cases:
        proc = node_launcher(*base, *args, extra_env=extra)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1] == f"megalm preflight: error: {proc.stderr.split('error: ')[-1].strip()}"
        assert message in proc.stderr, (message, proc.stderr[-2000:])
    # the other node's mark is there, but nothing listens at the rendezvous
    marks = tmp_path / "run" / "slurm" / "preflight-78"
    marks.mkdir(parents=True)
    (marks / "node1").write_text("node1")
    proc = node_launcher(*base, "--nproc-per-node", "1", "--nnodes", "2", "--rdzv", "127.0.0.1:9",
                         extra_env={"SLURMD_NODENAME": "node2", "SLURM_JOB_ID": "78", "SLURM_NODEID": "1"})
    assert proc.returncode == 2 and "node2 cannot reach the rendezvous at 127.0.0.1:9" in proc.stderr, proc.stderr[-2000:]


def test_submit_writes_the_job_for_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "megalm.cli", "slurm", "submit", CONFIG, f"train.run_dir={run_dir}", "--nodes", "4",
            "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu", "--container-image", "nvcr.io#me/megalm",
            "--dry-run", "train.steps=5000", "train.global_batch=32", "train.micro_batch_size=1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = (run_dir / "slurm" / "job.sbatch").read_text()
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=B:USR1@180", "#SBATCH --requeue", f"#SBATCH --output={run_dir}/slurm/%x-%j.out",
                 "export MEGALM_GPUS_PER_NODE=8", "--container-image=nvcr.io#me/megalm",
                 f"set -- {(REPO / CONFIG).resolve()} train.run_dir={run_dir} train.steps=5000 train.global_batch=32"]:
        assert line in job, line
    assert job.endswith((REPO / "megalm/cluster/job.sh").read_text()) and "--no-kill" not in job
    spare = subprocess.run([*args, "--spare-nodes", "1"], cwd=REPO, capture_output=True, text=True, env=env())
    assert spare.returncode == 0, spare.stderr
    job = (run_dir / "slurm" / "job.sbatch").read_text()
    assert all(line in job for line in ("#SBATCH --nodes=5", "#SBATCH --no-kill", "export MEGALM_SPARE_NODES=1"))
    # a signal lead as long as the time limit would stop the job as it starts
    bad = subprocess.run([*args, "--time", "2"], cwd=REPO, capture_output=True, text=True, env=env())
    assert bad.returncode == 2 and "slurm.signal_lead_s: 180 s is not shorter than the time limit 2 (120 s)" in bad.stderr

"""Training that heals itself (issue 20), as a user meets it through ``megalm train`` with default
settings: faults injected with ``MEGALM_FAULTS`` (megalm/train/faults.py) go through the same
arithmetic a real fault would."""

import json
import re
import time

import psutil
import pytest
import torch

from megalm.checkpoint.meta import CheckpointMeta
from megalm.checkpoint.shards import CheckpointReader
from megalm.errors import UsageError
from megalm.train.faults import parse
from tests.helpers import CONFIG, TINY, launcher, metrics, run_megalm, torchrun, wait_for_steps

# (processes, overrides, the rank that meets the faults): every optimizer path DeepSpeed takes
LAYOUTS = {
    "1 process, ZeRO 0, fp32 (the plain path megalm guards itself)": (1, [], 0),
    "dp=2, ZeRO 2, bf16": (2, ["train.zero_stage=2", "train.precision=bf16", "train.micro_batch_size=2"], 1),
    "dp=2, ZeRO 3": (2, ["train.zero_stage=3", "train.micro_batch_size=2"], 0),
    "tp=2, ZeRO 0, bf16 (DeepSpeed's bf16 optimizer)": (2, ["parallel.tp=2", "train.grad_clip=0",
                                                            "train.precision=bf16"], 1),
    "pp=2, ZeRO 1": (2, ["parallel.pp=2", "train.zero_stage=1", "train.micro_batch_size=2"], 1),
}


def saved(run_dir, step: int) -> tuple[int, dict[str, list[torch.Tensor]]]:
    """Adam's step count and every parameter's fp32 master and moments, as checkpoint ``step`` holds them."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    reader = CheckpointReader(ckpt, CheckpointMeta.read(ckpt))
    return reader.adam_step, {name: reader.local(name, None, 0, 1) for name in reader.names()}


def test_faults_are_read_or_refused():
    faults = parse("nan@5:rank=1, scale=1e30@7, slow=0.2@3-9:rank=2, mismatch@4")
    assert [(f.kind, f.first, f.last, f.rank) for f in faults] == [
        ("nan", 5, 5, 1), ("scale", 7, 7, None), ("slow", 3, 9, 2), ("mismatch", 4, 4, None)]
    assert faults[1].value == 1e30 and faults[2].value == 0.2 and faults[2].at(9) and not faults[2].at(10)
    for bad in ("nan3", "slow@4", "nan=2@4", "scale=x@1"):
        with pytest.raises(UsageError, match=f"MEGALM_FAULTS: cannot read '{bad}'; expected nan@STEPS, inf@STEPS,"):
            parse(bad)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_on_every_rank_and_changes_nothing(data_args, tmp_path):
    """A NaN loss at step 3 and an infinite one at step 4, on one rank: both steps skip
    the update on every rank, so checkpoints 2, 3 and 4 hold bit-identical weights, Adam moments
    and Adam step count; step 5 trains again; the log and the metrics say which steps and why.
    Then a loss spike (20 x) at step 8 on that rank rolls the run back to step 7 in every layout."""
    for name, (nproc, overrides, rank) in LAYOUTS.items():
        run_dir = tmp_path / name.split(" (")[0].replace(" ", "").replace(",", "_")
        args = ["train", CONFIG, *TINY, *data_args, *overrides, f"train.run_dir={run_dir}", "train.save_every=1",
                "train.keep_checkpoints=10", "train.eval_every=9", "train.log_every=5", "train.steps=9",
                "train.spike.warmup=5", "train.spike.window=3"]
        faults = {"MEGALM_FAULTS": f"nan@3:rank={rank},inf@4:rank={rank},scale=20@8:rank={rank}"}
        log = (run_megalm(*args, extra_env=faults) if nproc == 1 else torchrun(nproc, *args, extra_env=faults)).stderr
        assert "step 3 skipped: a non-finite loss or gradient (gradient norm " in log, (name, log[-3000:])
        assert "step 4 skipped: " in log and "weights, Adam moments and Adam's step count are unchanged" in log
        (step2, before), after3, after4, (step5, trained) = (saved(run_dir, s) for s in (2, 3, 4, 5))
        for adam_step, after in (after3, after4):
            assert adam_step == step2, name  # (DeepSpeed's bf16 optimizer counts one step more from its start)
            for param, tensors in before.items():
                for kept, now in zip(tensors, after[param]):
                    assert torch.equal(kept, now), (name, param)
        assert step5 == step2 + 1 and not torch.equal(before["embed.tok.weight"][0], trained["embed.tok.weight"][0]), name
        rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
        # a skipped step is logged at once; a row's loss is the mean of the steps taken since the last one
        assert rows[3]["skipped"] == [3] and rows[4]["skipped"] == [4] and rows[4]["loss"] is None, name
        assert rows[3]["loss"] > 0 and rows[4]["nonfinite"] == ["loss", "grad_norm"], name
        assert rows[5]["skipped_steps"] == 2 and rows[5]["loss"] > 0 and "skipped" not in rows[5], name
        assert "rollback 1 of at most 3: step 8: a loss spike: " in log, name
        assert "back to step_00000007 (from its copy held in memory) in " in log, (name, log[-3000:])
        assert rows[9]["rollbacks"] == 1 and rows[9]["skipped_steps"] == 3, (name, rows[9])
        # put back from memory as it was saved: step 8 (its data skipped after the rollback) saves step 7's state
        (adam7, state7), (adam8, state8) = saved(run_dir, 7), saved(run_dir, 8)
        assert adam8 == adam7 and all(torch.equal(a, b) for n in state7 for a, b in zip(state7[n], state8[n])), name
        if "ZeRO 2" in name:  # the 16-bit weights too (whole on each rank, the masters a fragment): as from disk
            again = run_dir.with_name("from-files")
            log = torchrun(nproc, *args, f"train.run_dir={again}", "train.rollback_copy=false", extra_env=faults).stderr
            assert "back to step_00000007 (from its files (train.rollback_copy=false)) in " in log, log[-3000:]
            ours, theirs = final_state(run_dir, 9), final_state(again, 9)
            assert all(torch.equal(a, b) for n in theirs for a, b in zip(ours[n], theirs[n])), name


def final_state(run_dir, step: int) -> dict[str, list[torch.Tensor]]:
    return saved(run_dir, step)[1]


@pytest.mark.slow
def test_a_loss_spike_rolls_back_and_ends_where_a_run_skipping_its_data_ends(data_args, tmp_path):
    """A loss 20 times the usual at step 8: the run rolls back to its checkpoint of step 6, skips
    step 8's data and trains on, in the same process, to the weights of a clean run given
    data.skip_steps=[8], bit for bit; then a run whose every step from 7 is non-finite rolls back
    until train.max_rollbacks stops it with one line, retention having kept what it went back to."""
    args = ["train", CONFIG, *TINY, *data_args, "train.steps=12", "train.save_every=2", "train.eval_every=12",
            "train.spike.warmup=4", "train.spike.window=5"]
    spiked, clean = tmp_path / "spiked", tmp_path / "clean"
    log = run_megalm(*args, f"train.run_dir={spiked}", extra_env={"MEGALM_FAULTS": "scale=20@8"}).stderr
    run_megalm(*args, f"train.run_dir={clean}", "data.skip_steps=[8]")
    assert "rollback 1 of at most 3: step 8: a loss spike: " in log, log[-3000:]
    back = re.search(r"back to step_00000006 \(from its copy held in memory\) in ([\d.]+) s,", log)
    assert back and float(back.group(1)) < 10, log[-3000:]  # detection to training again
    assert "step 8: its data is skipped (after a rollback)" in log
    ours, theirs = final_state(spiked, 12), final_state(clean, 12)
    assert all(torch.equal(a, b) for name in theirs for a, b in zip(ours[name], theirs[name]))
    rows = metrics(spiked)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # the rolled-back steps' rows replaced
    (back,) = [r for r in rows if "rollback" in r]
    assert back["step"] == 6 and back["rollback"]["at_step"] == 8 and back["rollback"]["skip_data"] == [8]
    assert rows[-2]["rollbacks"] == 1 and rows[-2]["skipped_steps"] == 1

    # every step from 7 on non-finite, a checkpoint each step: 3 in a row roll back to step 6 (kept by
    # retention although 7 and 8, the newest 2, were saved since), twice; the third stops the run
    broken = tmp_path / "broken"
    faults = ",".join(f"nan@{s}" for s in range(7, 40))
    proc = run_megalm(*args, f"train.run_dir={broken}", "train.max_rollbacks=2", "train.steps=20",
                      "train.save_every=1", check=False, extra_env={"MEGALM_FAULTS": faults})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("megalm: rollback ") == 2, proc.stderr[-3000:]
    # newer checkpoints were saved since: back to step 6 from its files
    assert "back to step_00000006 (from its files (the copy held in memory is of step_00000008)) in " in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megalm: error: step ") and "3 non-finite steps in a row" in last, last
    assert "after 2 rollbacks (train.max_rollbacks=2); stopping" in last, last


@pytest.mark.slow
def test_a_killed_rank_is_restarted_in_place_and_the_run_ends_as_if_never_hit(data_args, tmp_path):
    """launch/train.sh with 2 processes; rank 1 is killed (-9) mid-run: the node launcher starts the
    ranks again from the newest checkpoint, without anyone's help, and the run ends on the weights
    of an uninterrupted run, bit for bit. (A rank's own error is not restarted, it would recur:
    test_failures.py, test_the_first_error_reaches_every_rank_within_seconds.)"""
    args = [CONFIG, *TINY, *data_args, "train.steps=40", "train.save_every=5", "train.eval_every=40",
            "train.micro_batch_size=2", "train.log_every=5"]
    run_dir, reference = tmp_path / "hit", tmp_path / "reference"
    run = launcher(*args, f"train.run_dir={run_dir}", nproc=2)
    wait_for_steps(run, run_dir, 12)
    victim = next(p for p in psutil.Process(run.proc.pid).children(recursive=True)
                  if "megalm.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1")
    victim.kill()
    hit = time.monotonic() - run.started
    run.end()
    assert run.proc.returncode == 0, run.stderr[-4000:]
    assert "megalm node: a training process died without a word (" in run.stderr
    assert "restarting the ranks from the newest checkpoint (restart 1 of at most 3, slurm.max_restarts)" in run.stderr
    resumed = run.at("megalm[0]: train: lm, 40 steps")  # the second one: training again
    starts = [t for t, line in run.lines if line.startswith("megalm[0]: train: lm, 40 steps")]
    assert len(starts) == 2 and "from step 0" not in run.last("megalm[0]: train: ")
    assert starts[1] - hit < 20, (hit, starts)  # from the kill to training again
    torchrun(2, "train", *args, f"train.run_dir={reference}")
    ours, theirs = saved(run_dir, 40)[1], saved(reference, 40)[1]
    assert all(torch.equal(a, b) for name in theirs for a, b in zip(ours[name], theirs[name]))
    print(f"\nrank 1 killed {hit:.1f} s in; training again {starts[1] - hit:.1f} s later (first start {resumed:.1f} s)")


@pytest.mark.slow
def test_a_slow_rank_is_named_and_a_mismatched_collective_is_shown_on_every_rank(data_args, tmp_path):
    """4 ranks; rank 2 takes 0.2 s more before its backward (and the gradient all-reduce) at every
    step: the warning names it by step 10 and the metrics call it the slowest. At step 14 rank 1
    makes an all-reduce the others do not make: the run hangs; within the watchdog timeout every
    rank prints and writes its newest collectives, and the verdict names rank 1 as the odd one out."""
    timeout_s = 8  # (short for a test, long enough for a loaded machine's first steps)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = torchrun(4, "train", CONFIG, *TINY, *data_args, "train.micro_batch_size=1", "train.steps=30",
                    f"train.run_dir={run_dir}", f"train.watchdog_timeout_s={timeout_s}", check=False,
                    extra_env={"MEGALM_FAULTS": "slow=0.2@1-30:rank=2,mismatch@14:rank=1"})
    took = time.monotonic() - started
    log = proc.stderr
    assert "megalm[0]: rank 2 (" in log and ") is a straggler: its own time " in log, log[-4000:]
    named_at = int(log.split(") is a straggler: ")[1].split("up to step ")[1].split(":")[0])
    assert named_at <= 10 and log.count("is a straggler") == 1, named_at
    rows = [r for r in metrics(run_dir) if "loss" in r]
    # (a loaded 2-core machine can stall another rank for a step: rank 2 in most rows, its median lag ~0.2 s)
    seen = [(r["step"], r["slowest_rank"], r["slowest_rank_lag_s"]) for r in rows]
    lags = sorted(r["slowest_rank_lag_s"] for r in rows if r["slowest_rank"] == 2)
    assert len(rows) == 13 and len(lags) >= 10 and 0.15 < lags[len(lags) // 2] < 0.4, seen
    verdict = next((line for line in log.splitlines() if line.startswith("megalm[0]: watchdog: every rank is stuck")),
                   None)
    assert verdict is not None, log[-6000:]
    assert ("ranks 0, 2, 3 wait in all_reduce on dp 0,1,2,3 #" in verdict and "(16 B float64); rank 1 waits in "
            "all_reduce on world #" in verdict and "(4 B float32)" in verdict and "rank 1 the odd one out" in verdict)
    for rank in range(4):
        assert f"megalm[{rank}]: its newest collectives ({run_dir}/collectives/rank-{rank}.json): " in log
        dump = json.loads((run_dir / "collectives" / f"rank-{rank}.json").read_text())
        last = dump["collectives"][-1]
        assert dump["why"] == verdict.removeprefix("megalm[0]: ").split("; ending the run")[0]
        assert len(dump["collectives"]) == 64 and last["step"] == 14, rank
        assert (last["group"], last["bytes"]) == (("world", 4) if rank == 1 else ("dp 0,1,2,3", 16)), (rank, last)
        # the verdict came within the watchdog timeout (plus its ticks) of the stray collective
        assert dump_time(run_dir, rank) - last["started"] < timeout_s + 3, rank
    assert proc.returncode != 0 and took < 60, took


def test_a_rank_still_setting_up_is_not_stuck_until_the_others_have_waited_the_timeout(tmp_path):
    """A loaded host's rank can take longer than the timeout to set up (its start is what its
    heartbeat's progress says until training starts). It is not stuck while it sets up; once the
    training ranks have waited the timeout for it, it is the rank named. (A CI run named such a rank
    'stuck at step 0 in starting' 10 s after its start, at watchdog_timeout_s=8.)"""
    from megalm.train.watchdog import Watchdog

    watchdog = Watchdog(8, tmp_path / "failures.txt")
    watchdog.rank, watchdog.world = 0, 2
    now = time.time()

    def beat(armed: bool, progress_s_ago: float) -> dict:
        return {"node": "vm", "pid": 1, "step": 0, "phase": "forward-backward" if armed else "starting",
                "beat": now, "progress": now - progress_s_ago, "finished": False, "armed": armed, "collective": None}

    assert watchdog._judge({0: beat(True, 3), 1: beat(False, 10)}, range(2)) is None
    judged = watchdog._judge({0: beat(True, 9), 1: beat(False, 16)}, range(2))
    assert judged["culprits"] == [1] and judged["message"].startswith(
        "rank 1 on vm (pid 1) is still setting up, 16 s after it started, while the others have waited 9 s"), judged


def dump_time(run_dir, rank: int) -> float:
    return (run_dir / "collectives" / f"rank-{rank}.json").stat().st_mtime


def _jittered_steps(rank: int, world: int, port: int, out) -> None:
    """One rank of test_no_false_straggler_...: steps of 3 ms +-20%, timed and judged as the trainer
    does (collectives.py, StopFlag.agreed, StragglerWatch)."""
    import random

    import torch.distributed as dist

    from megalm.observe.stragglers import StragglerWatch
    from megalm.parallel.collectives import RECORDER
    from megalm.train.preemption import StopFlag

    RECORDER.install(64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    watch, stop, rng = StragglerWatch(1.5, 5, [0] * world, [f"rank {r}" for r in range(world)]), StopFlag(), \
        random.Random(rank)
    warnings = []
    for step in range(1, 1011):  # (the per-step reduction is where the ranks wait for each other)
        started, _ = time.perf_counter(), RECORDER.blocked_s()
        time.sleep(0.003 * rng.uniform(0.8, 1.2) + (0.012 if step > 1000 and rank == 3 else 0))
        own = time.perf_counter() - started - RECORDER.blocked_s()
        warning = watch.observe(step, stop.agreed(torch.device("cpu"), 0.0, own)[2])
        if warning:
            warnings.append((step, warning))
    out.put((rank, warnings))
    dist.destroy_process_group()


def test_no_false_straggler_over_1000_jittered_steps_and_a_slow_rank_named_at_once():
    """4 ranks, 1,000 steps with +-20% random jitter each: no warning; then rank 3 takes 5x as long:
    named after train.straggler.steps (5) steps."""
    import socket

    mp = torch.multiprocessing.get_context("fork")  # (spawn would import torch again in each)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Queue()
    procs = [mp.Process(target=_jittered_steps, args=(rank, 4, port, out)) for rank in range(4)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, warnings in results.items():  # every rank sees the same numbers, so judges the same
        assert [step for step, _ in warnings] == [1005], (rank, warnings)
        assert warnings[0][1].startswith("rank 3 (rank 3) is a straggler: "), warnings

"""After a Slurm job's training step ends: requeue the job, or not, and say why.

    python -m megalm.cluster.requeue CONFIG [overrides] --exit-code RC     (prints: requeue | done)

Finished (the newest checkpoint is at ``train.steps``, or ``train.stop_at``): done. A config or usage
error (exit code 2: the preflight's, say) would fail the same way again: done. Otherwise the
run stopped early — the time limit, a preemption, a failed node — and is requeued to resume from
its newest checkpoint; unless it has now ended at the same step ``slurm.max_requeues`` times in a
row, which means it fails there every time: then it stops, saying so. The count lives in the run
dir (``slurm/requeues.json``), so it survives the requeues themselves.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megalm.checkpoint import catalog
from megalm.checkpoint.meta import CheckpointMeta
from megalm.config import load_config
from megalm.errors import EXIT_USAGE, CheckpointError
from megalm.records import Record


@dataclass(frozen=True)
class RequeueHistory(Record):
    FILE: ClassVar[str] = "requeues.json"
    VERSION: ClassVar[int] = 1

    step: int = -1  # the step the last requeued job had reached
    in_a_row: int = 0  # how many jobs in a row ended at that step
    jobs: list[str] = field(default_factory=list)  # every job id that requeued
    version: int = VERSION


def newest_step(run_dir: Path) -> int:
    for ckpt in catalog.newest_first(catalog.checkpoint_root(run_dir)):
        try:
            return CheckpointMeta.read(ckpt).step
        except CheckpointError:
            continue
    return 0


def decide(config: str, overrides: list[str], exit_code: int, job_id: str) -> tuple[bool, str]:
    """(requeue?, why)."""
    cfg = load_config(config, overrides)
    run_dir, t = Path(cfg.train.run_dir), cfg.train
    target = min(t.steps, t.stop_at or t.steps)
    step = newest_step(run_dir)
    if step >= target:
        return False, f"finished: the newest checkpoint is at step {step} of {target}"
    if exit_code == EXIT_USAGE:
        return False, (f"not requeueing: a config or usage error (exit code {exit_code}) does not go away by "
                       f"itself: see the log above")
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    history = RequeueHistory.read(folder) if (folder / RequeueHistory.FILE).is_file() else RequeueHistory()
    in_a_row = history.in_a_row + 1 if step == history.step else 1
    if in_a_row > cfg.slurm.max_requeues:
        return False, (f"not requeueing: the job ended at step {step} (exit code {exit_code}) {in_a_row} times in a "
                       f"row, more than slurm.max_requeues={cfg.slurm.max_requeues}; it fails there every time: "
                       f"see the log above")
    RequeueHistory(step=step, in_a_row=in_a_row, jobs=[*history.jobs, job_id]).write(folder)
    return True, (f"stopped at step {step} of {target} (exit code {exit_code}): requeueing to resume from the "
                  f"newest checkpoint ({in_a_row} of at most {cfg.slurm.max_requeues} at this step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megalm.cluster.requeue", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--exit-code", type=int, required=True, help="how the training step ended")
    p.add_argument("--job-id", default="?")
    args = p.parse_args(argv)
    requeue, why = decide(args.config, args.overrides, args.exit_code, args.job_id)
    print(f"megalm job: {why}", file=sys.stderr, flush=True)
    print("requeue" if requeue else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

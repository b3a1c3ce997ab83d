"""The step loop every training run shares (pretraining and classification fine-tuning).

A run hands in its phases — ``train_step``, ``watch_ranks`` (name a straggler), ``log_step``, ``recover`` (roll back after a loss spike
or non-finite steps), ``evaluate``, ``save`` — and this loop calls them in order until the last
step or a stop signal (SIGTERM, SIGUSR1 or Ctrl-C, agreed by
every rank: see preemption.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from megalm.observe.metrics import ProgressBar
from megalm.train.preemption import StopFlag

log = logging.getLogger("megalm")

# how a step ended (a run's train_step says)
TRAINED, NONFINITE, DATA_SKIPPED = "trained", "non-finite", "data skipped"


class LoopEnd(NamedTuple):
    checkpoint: Path | None  # the last checkpoint saved (None if none was)
    evaluated: Any  # the last evaluation's result (None if none ran)
    stopped: bool  # a stop signal ended the loop before its last step


def run_steps(run, last: int, profiler=None) -> LoopEnd:
    """Train, log, evaluate and save, step by step, up to step ``last``. ``run`` has ``cfg``,
    ``state.step``, ``engine`` and ``world`` and the four phases; ``profiler`` (a StepProfiler)
    brackets each step."""
    t = run.cfg.train
    bar = ProgressBar(t.steps, run.state.step, enabled=run.world.is_main and t.progress)
    stop = StopFlag()
    ckpt = evaluated = None
    stopped = False
    while run.state.step < last:
        started = time.perf_counter()
        step = run.state.step + 1
        logging_step = step % t.log_every == 0 or step == last
        lr = run.engine.get_lr()[0]  # this step's; the scheduler advances inside the optimizer step
        with profiler.step(step) if profiler is not None else contextlib.nullcontext():
            outcome = run.train_step(measure=logging_step)
        signalled, loss, own_s = stop.agreed(run.world.device, run.step_loss, run.step_own_s)
        run.watch_ranks(own_s)
        if logging_step or signalled or outcome != TRAINED:
            run.log_step(lr, time.perf_counter() - started, bar)
        if run.recover(loss, outcome):
            continue  # rolled back to an earlier step: nothing of this one is evaluated or saved
        if step % t.eval_every == 0 or step == t.steps:
            evaluated = run.evaluate()
        if t.save and ((t.save_every and step % t.save_every == 0) or step == last or signalled):
            ckpt = run.save()
        if signalled and step < last:
            log.warning("stopped at step %d of %d after a signal; resume by running the same command again",
                        step, last)
            stopped = True
            break
    bar.close()
    return LoopEnd(ckpt, evaluated, stopped)

"""``megalm train`` (and ``megalm finetune``): the Trainer, read top to bottom.

One trainer for every task: pretraining, continued pretraining, masked LM and classification
differ only in the task (``train.task``: megalm.train.tasks), which brings the data, how it is
scored and the config's data-decided fields; the model's head and loss follow from the config.

Set-up, in ``__init__``: the world and its 3D mesh, the watchdog (from here on a failure on any rank
is told first, on every rank) → the run dir's lock → the task reads its data → the config resolved
once (``config.resolve``) → the model in its DeepSpeed engine → the stateful parts (step counters,
the task's loader, random streams) and the checkpointer that saves them → resume (or start from
``train.init_from``). Then ``run`` loops (``run_steps``): ``train_step`` (one optimizer step over the
micro-batches), ``log_step`` (metrics), ``evaluate`` every ``train.eval_every`` steps, ``save`` every
``train.save_every`` steps or when a signal asks to stop; at the end a final evaluation, checkpoint,
the task's outputs and the loss plot.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megalm_kernels.provenance import device_name

from megalm.checkpoint import catalog
from megalm.checkpoint.store import Checkpointer
from megalm.config import Config, batch_layout, validate
from megalm.data.loader import Step
from megalm.errors import EXIT_STOPPED, FAILURES_FILE, TrainingDiverged
from megalm.model.transformer import parameter_count
from megalm.observe.flops import flops_per_token, mfu, peak_tflops
from megalm.observe.metrics import (MetricsSink, ProgressBar, Throughput, data_hash, drop_metrics_after,
                                    peak_memory_gb, start_memory_peak)
from megalm.observe.plot import plot_loss
from megalm.observe.profile import StepProfiler
from megalm.observe.stragglers import StragglerWatch
from megalm.observe.timing import PhaseTimer
from megalm.parallel.collectives import RECORDER
from megalm.parallel.distributed import all_reduce_mean, init_distributed, launched_world_size, node_name
from megalm.parallel.context_parallel import sequence_parts
from megalm.parallel.mesh import build_mesh
from megalm.train.engine import build_engine, build_model
from megalm.train.evaluate import to_device
from megalm.train.faults import Faults
from megalm.train.guard import StepGuard
from megalm.train.rollback import Anomaly, AnomalyWatch
from megalm.train.loop import DATA_SKIPPED, NONFINITE, TRAINED, run_steps
from megalm.train.pipeline import Pipeline
from megalm.train.run_lock import RunLock
from megalm.train.state import RNGState, TrainState
from megalm.train.tasks import build_task
from megalm.train.watchdog import Watchdog

log = logging.getLogger("megalm")


@dataclass
class Summary:
    run_dir: Path
    steps: int
    tokens: int
    scores: dict | None  # the last evaluation's (None: stopped before any)
    wall_s: float
    checkpoint: Path | None
    unigram_entropy_nats: float | None  # a language model's data: what ignoring context scores
    stopped: bool = False  # by a signal, before the last step (after saving)

    @property
    def val_loss(self) -> float:
        return self.scores["val_loss"] if self.scores else math.nan

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)

    def report(self) -> int:
        """The run's last line (rank 0 logs it); the exit code of the command that ran it."""
        if self.stopped:
            log.info("stopped at step %d (%d tokens) after %.0fs; checkpoint %s; run the same command again to "
                     "resume (exit code %d)", self.steps, self.tokens, self.wall_s, self.checkpoint, EXIT_STOPPED)
            return EXIT_STOPPED
        log.info("done: %d steps, %d tokens in %.0fs; val loss %.4f (ppl %.2f); checkpoint %s",
                 self.steps, self.tokens, self.wall_s, self.val_loss, self.val_ppl, self.checkpoint)
        return 0


def start_world(cfg: Config):
    """Join the launch's processes and lay them out as the 3D mesh (``megalm eval`` starts the same way)."""
    validate(cfg, launched_world_size())  # layout errors surface before any process group starts
    RECORDER.install(cfg.train.collectives_kept)  # before DeepSpeed's comm layer takes its functions
    world = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    mesh = build_mesh(cfg.parallel.tp, cfg.parallel.pp, world.world_size, world.rank, cfg.parallel.cp)
    if world.is_main:
        log.info(mesh.describe())
    return world, mesh


class Trainer:
    def __init__(self, cfg: Config):
        self.t_start = time.time()
        self.world, self.mesh = start_world(cfg)
        self.watchdog = Watchdog(cfg.train.watchdog_timeout_s, Path(cfg.train.run_dir) / FAILURES_FILE)
        self.watchdog.start()
        with self.watchdog.reporting():  # from here on a failure on any rank is told first, on every rank
            self._set_up(cfg)

    # ------------------------------------------------------------------------------ set-up

    def _set_up(self, cfg: Config) -> None:
        self.lock = self._lock_run_dir(cfg)
        self.task = build_task(cfg, self.world)  # reads (rank 0: prepares) the data
        self.cfg = self.task.resolve(cfg, self.world.world_size)  # the final config: every phase reads this one
        self.run_dir = Path(self.cfg.train.run_dir)
        self.batch = batch_layout(self.cfg, self.mesh.data_parallel)
        self.engine = self._build_engine()
        self.pipeline = Pipeline(self.engine.module, self.mesh, self.batch.grad_accum, self.world.device) \
            if self.mesh.pp > 1 else None
        self.guard, self.faults, self.watch = StepGuard(self.engine), Faults(self.world.rank), AnomalyWatch(cfg)
        self.pinned: Path | None = None  # kept from retention while non-finite steps may roll back to it
        self.state, self.rng, self.loader = TrainState(), RNGState(), self.task.loader(self.batch, self.mesh)
        self.checkpointer = Checkpointer(self.run_dir, self.engine, self.mesh, self.cfg, self.task.tokenizer,
                                         shared={"train": self.state, "data": self.loader}, per_rank={"rng": self.rng})
        self._resume()

        t = self.cfg.train
        self.flops_per_token = flops_per_token(self.cfg.model, self.cfg.classify.max_len if t.task == "classify"
                                               else self.cfg.data.seq_len)
        self.peak_tflops = peak_tflops(device_name(self.world.device), t.precision, t.peak_tflops)
        self.sink = MetricsSink(self.cfg, self.run_dir, enabled=self.world.is_main)
        self.profiler = StepProfiler(t.profile, self.world.rank, self.run_dir, self.world.device)
        self.timer = PhaseTimer(self.world.device)
        self.throughput = Throughput()
        self.interval_losses: list[torch.Tensor] = []  # of the steps taken (a skipped step's are dropped)
        self.interval_skipped: list[tuple[int, str]] = []  # (step, NONFINITE or DATA_SKIPPED) since the last log
        self.step_loss = math.nan  # this rank's loss of the last step (NaN: none taken)
        self.interval_data_hash = 0  # which sequences were trained on since the last log (any layout)
        self.interval_data_wait_s = 0.0
        self.interval_started = time.perf_counter()
        self.step_own_s = math.nan  # this rank's time in the last step, less its time blocked in collectives
        self.stragglers = self._straggler_watch()
        # bad shards, tokens per source
        self.interval_counts = torch.zeros(1 + len(self.task.source_names), dtype=torch.int64)

    def _straggler_watch(self) -> StragglerWatch:
        """Collective: every rank's host and device, for naming a slow one."""
        where = [None] * self.world.world_size
        device = self.world.device
        dist.all_gather_object(where, f"{node_name()}, {device}" +
                               (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
        per_stage = self.mesh.dp * self.mesh.tp  # rank = (pp_rank * dp + dp_rank) * tp + tp_rank
        s = self.cfg.train.straggler
        return StragglerWatch(s.ratio, s.steps, [r // per_stage for r in range(self.world.world_size)], where)

    def _lock_run_dir(self, cfg: Config) -> RunLock | None:
        """Rank 0 holds the run dir for this run (a second run on it is refused), until the process ends."""
        if not self.world.is_main:
            return None
        lock = RunLock(Path(cfg.train.run_dir))
        lock.acquire()
        self.watchdog.at_exit(lock.release)
        return lock

    def _build_engine(self):
        RNGState.seed(self.cfg.train.seed)  # dropout; weights are seeded per layer (tensor_parallel.init_layer)
        self.mem_base_gb = start_memory_peak()  # the peak minus this: what the model and its training add
        engine = build_engine(self.cfg, build_model(self.cfg, self.mesh, self.world.device), self.mesh)
        m = self.cfg.model
        if self.world.is_main:
            log.info("model: %s (%s style), %.2fM parameters, %d layers x %d wide, vocab %d%s; %s", m.name,
                     m.style, parameter_count(m) / 1e6, m.n_layers, m.d_model, m.vocab_size,
                     f", classifier of {len(m.labels)} labels" if m.labels else "", self.task.describe())
        return engine

    def _resume(self) -> None:
        """Resume; only then record this run's config and tokenizer (a refused resume changes nothing)."""
        self.checkpointer.resume()
        if self.world.is_main:
            drop_metrics_after(self.run_dir, self.state.step)  # rows of steps the checkpoint lacks are redone
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            shutil.copyfile(self.task.tokenizer, self.run_dir / "tokenizer.json")

    # ------------------------------------------------------------------------------ phases

    def train_step(self, measure: bool) -> str:
        """One optimizer step over this rank's micro-batches (with ``measure``, a logged step, its
        phases timed). Returns how it ended: TRAINED; NONFINITE, a non-finite loss or gradient on some
        rank, which leaves weights and optimizer state as they were (guard.py); or DATA_SKIPPED, a step
        of data.skip_steps or of a rollback's, whose data is read and not trained on."""
        self.checkpointer.check()  # a background save that failed stops training here
        self.watchdog.progress(self.state.step, "data")
        self.step_loss = self.step_own_s = math.nan
        RECORDER.step = self.state.step + 1
        if self.state.step + 1 in {*self.cfg.data.skip_steps, *self.state.skip_data}:
            return self._skip_data()
        self.timer.start_step(measure)
        started, _ = time.perf_counter(), RECORDER.blocked_s()
        with self.timer.phase("data"):
            step = sequence_parts(next(self.loader), self.mesh)
        self.interval_data_wait_s += time.perf_counter() - started
        self.watchdog.progress(self.state.step, "forward-backward")
        self.faults.disturb(self.state.step + 1, self.world.device)
        scale = self._account(step)
        losses_before = len(self.interval_losses)
        if self.pipeline is not None:
            with self.timer.phase("pipeline"):  # every micro-batch's forward and backward, in the schedule's order
                loss = self.pipeline.train_batch(step.micro_batches, scale)
            self.checkpointer.before_step()
            with self.timer.phase("optimizer"):
                self.engine.allreduce_gradients()
                self.engine.step()
            self.interval_losses.append(loss)
        else:
            device = self.world.device
            for inputs, labels in step.micro_batches:
                with self.timer.phase("forward"):
                    loss = self.engine(inputs.to(device, non_blocking=True), (to_device(labels, device), scale))
                with self.timer.phase("backward"):
                    self.engine.backward(loss)
                if self.engine.is_gradient_accumulation_boundary():
                    self.checkpointer.before_step()  # a save in flight must have copied the weights it changes
                with self.timer.phase("optimizer"):
                    self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                self.interval_losses.append(loss.detach().float())
                self.watchdog.progress(self.state.step, "forward-backward")
        self.state.step += 1
        if self.guard.skipped():
            del self.interval_losses[losses_before:]
            self.interval_skipped.append((self.state.step, NONFINITE))
            self.state.skipped_steps.append(self.state.step)
            outcome = NONFINITE
        else:
            self.step_loss = torch.stack(self.interval_losses[losses_before:]).mean().item()  # (waits for the device)
            outcome = TRAINED
        self.step_own_s = time.perf_counter() - started - RECORDER.blocked_s()
        return outcome

    def _skip_data(self) -> str:
        """Read the next step's data and train nothing on it (the data order after it stays that of a
        run that trained it); the learning-rate schedule moves on, as for any step."""
        next(self.loader)
        self.state.step += 1
        self.state.skipped_steps.append(self.state.step)
        self.interval_skipped.append((self.state.step, DATA_SKIPPED))
        self.engine.lr_scheduler.step()
        if self.world.is_main:
            log.info("step %d: its data is skipped (%s)", self.state.step, "data.skip_steps" if self.state.step in
                     self.cfg.data.skip_steps else "after a rollback")
        return DATA_SKIPPED

    def _account(self, step: Step) -> torch.Tensor:
        """The loss scale of this step's micro-batches: with it, the loss functions' scaled sums make
        DeepSpeed's mean over micro-batches and ranks the exact mean over the labels that count in
        the whole global batch (see LossFunction). Also notes what was read: the tokens, which
        sequences, from which source, bad shards."""
        counts = torch.tensor([step.loss_tokens, step.tokens], dtype=torch.float64, device=self.world.device)
        dist.all_reduce(counts, group=self.mesh.dp_group)
        counted, tokens = counts.tolist()
        self.state.tokens += int(tokens)
        self.throughput.add(int(tokens))
        if self.mesh.tp_rank == 0 and self.mesh.pp_rank == 0 and self.mesh.cp_rank == 0:  # each sequence counted once
            self.interval_data_hash += data_hash([step.sequences])
            self.interval_counts += torch.tensor([len(step.bad_shards), *step.tokens_by_source])
        scale = self.mesh.dp * self.batch.grad_accum / max(counted, 1.0) * self.faults.factor(self.state.step + 1)
        return torch.tensor(scale, dtype=torch.float32)

    def watch_ranks(self, own_s: list[float]) -> None:
        """After each step, every rank's own time in it (the same on every rank): a straggler is named."""
        warning = self.stragglers.observe(self.state.step, own_s)
        if warning and self.world.is_main:
            log.warning(warning)

    def log_step(self, lr: float, step_time_s: float, bar: ProgressBar) -> None:
        """Collective: the mean loss since the last log (of the steps taken), over every rank, and the
        step's numbers; a skipped step is logged at once, with its data."""
        any_taken = bool(self.interval_losses)
        taken = torch.stack(self.interval_losses).mean().item() if any_taken else math.nan
        loss = all_reduce_mean(taken, self.world.device)
        sums = torch.cat([torch.tensor([self.interval_data_hash]), self.interval_counts]).to(self.world.device)
        dist.all_reduce(sums)
        data_wait = torch.tensor([self.interval_data_wait_s], device=self.world.device)
        dist.all_reduce(data_wait, op=dist.ReduceOp.MAX)  # the slowest rank's wait holds everyone up
        batch_hash, bad_shards, *by_source = sums.tolist()
        self.state.bad_shards += bad_shards
        for name, n in zip(self.task.source_names, by_source):
            self.state.tokens_by_source[name] = self.state.tokens_by_source.get(name, 0) + n
        interval_s = time.perf_counter() - self.interval_started
        self.interval_losses.clear()
        self.interval_data_hash, self.interval_data_wait_s, self.interval_started = 0, 0.0, time.perf_counter()
        self.interval_counts.zero_()
        tokens_per_s = self.throughput.rate()
        tflops = self.flops_per_token * tokens_per_s / self.world.world_size / 1e12
        # (none when the interval only skipped data: no gradient was taken)
        grad_norm = self.engine.get_global_grad_norm() \
            if any_taken or any(why == NONFINITE for _, why in self.interval_skipped) else None
        skipped = [step for step, _ in self.interval_skipped]
        nonfinite = [step for step, why in self.interval_skipped if why == NONFINITE]
        self.interval_skipped = []
        if nonfinite and self.world.is_main:  # (a step whose data was skipped said so itself)
            log.warning("step %s skipped: a non-finite loss or gradient (gradient norm %s); weights, Adam moments "
                        "and Adam's step count are unchanged; the step's data: data_hash %d",
                        ", ".join(map(str, nonfinite)), grad_norm if grad_norm is None else float(grad_norm),
                        batch_hash)
        self.sink.write({
            "step": self.state.step, "loss": loss, "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": self.state.tokens, "tokens_per_s": tokens_per_s, "step_time_s": step_time_s,
            "tflops_per_gpu": tflops, "mfu": mfu(tflops, self.peak_tflops), "mem_peak_gb": peak_memory_gb(),
            "mem_base_gb": self.mem_base_gb, "data_hash": batch_hash, "data_wait_s": data_wait.item(),
            "data_wait_fraction": data_wait.item() / interval_s, "bad_shards": self.state.bad_shards,
            "tokens_by_source": dict(self.state.tokens_by_source),
            "step_breakdown_s": dict(self.timer.seconds), "skipped_steps": len(self.state.skipped_steps),
            **({"skipped": skipped} if skipped else {}), "rollbacks": self.state.rollbacks,
            **self.stragglers.interval(), **self.task.log_fields(),
        })
        bar.update(self.state.step, loss, lr, tokens_per_s, mfu(tflops, self.peak_tflops))

    def evaluate(self) -> dict:
        """Collective: the task's scores on its held-out data; their ``val_*`` numbers go to the metrics."""
        self.watchdog.progress(self.state.step, "evaluation")
        scores = self.task.evaluate(self.engine, self.mesh, self.world.device)
        self.sink.write({"step": self.state.step, "tokens": self.state.tokens,
                         **{k: v for k, v in scores.items() if k.startswith("val_")}})
        self.throughput.rate()  # evaluation time is not training throughput
        return scores

    def recover(self, loss: float, outcome: str) -> bool:
        """After each step, on every rank alike (``loss``: the step's mean over ranks): whether a loss
        spike or a run of non-finite steps made the run roll back (rollback.py)."""
        if outcome == DATA_SKIPPED:
            return False
        self._pin(outcome == NONFINITE)
        anomaly = self.watch.observe(self.state.step, loss, outcome == NONFINITE)
        return anomaly is not None and self.roll_back(anomaly)

    def _pin(self, nonfinite: bool) -> None:
        """While non-finite steps run on, retention keeps the newest checkpoint from before them."""
        if nonfinite and self.pinned is None:
            self.checkpointer.wait()  # the save in flight may be the newest from before
            before = catalog.newest_before(self.checkpointer.root, self.state.step)
            if before is not None and before not in self.checkpointer.protected:
                self.pinned = before
                self.checkpointer.protected.add(self.pinned)
        elif not nonfinite and self.pinned is not None:
            self.checkpointer.protected.discard(self.pinned)
            self.pinned = None

    def roll_back(self, anomaly: Anomaly) -> bool:
        """Collective: back to the newest checkpoint before ``anomaly``, whose steps' data is then
        skipped; False when there is none to go back to (the run goes on, warned)."""
        t, step = self.cfg.train, self.state.step
        if self.state.rollbacks >= t.max_rollbacks:
            raise TrainingDiverged(f"step {step}: {anomaly.reason}, after {self.state.rollbacks} rollbacks "
                                   f"(train.max_rollbacks={t.max_rollbacks}); stopping: look at the data of steps "
                                   f"{', '.join(map(str, anomaly.steps))} and at the learning rate")
        started = time.perf_counter()
        self.checkpointer.wait()
        # rank 0 commits a save once every rank wrote it: its view of the checkpoints is the one
        decided = [catalog.newest_before(self.checkpointer.root, anomaly.first)]
        dist.broadcast_object_list(decided, src=0)
        target = decided[0]
        if target is None:
            if self.world.is_main:
                log.warning("step %d: %s; no checkpoint from before step %d to roll back to (train.save_every), "
                            "so training goes on", step, anomaly.reason, anomaly.first)
            return False
        skip = sorted({*self.state.skip_data, *anomaly.steps})
        rollbacks = self.state.rollbacks + 1
        self.loader = self.task.loader(self.batch, self.mesh)  # a loader is restored before its first step
        self.checkpointer.shared["data"] = self.loader
        source = self.checkpointer.roll_back(target)
        self.state.skip_data, self.state.rollbacks = skip, rollbacks
        self.watch.rolled_back(self.state.step)
        self._pin(False)  # a new start: the next run of non-finite steps pins its own
        self.interval_losses.clear()
        self.interval_skipped.clear()
        if self.world.is_main:
            log.warning("rollback %d of at most %d: step %d: %s; back to %s (from %s) in %.2f s, the data of step "
                        "%s skipped", rollbacks, t.max_rollbacks, step, anomaly.reason, target.name, source,
                        time.perf_counter() - started, ", ".join(map(str, anomaly.steps)))
            drop_metrics_after(self.run_dir, self.state.step)  # the steps after it are trained again
            self.sink.write({"step": self.state.step, "rollback": {"at_step": step, "reason": anomaly.reason,
                                                                   "skip_data": anomaly.steps, "count": rollbacks}})
        return True

    def save(self) -> Path:
        """Collective: a checkpoint of the engine and every stateful part."""
        self.watchdog.progress(self.state.step, "save")
        path = self.checkpointer.save(self.state.step)
        self.throughput.rate()
        return path

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> Summary:
        """Train to ``train.steps`` (or ``train.stop_at``, or a stop signal), then report."""
        with self.watchdog.reporting():
            return self._run()

    def _run(self) -> Summary:
        t = self.cfg.train
        if self.world.is_main:
            b = self.batch
            log.info("train: %s, %d steps of %d sequences (%d ranks x %d micro-batches of %d%s), from step %d",
                     t.task, t.steps, b.global_batch, b.dp, b.grad_accum, b.micro_batch_size,
                     f", {b.padding} padding" if b.padding else "", self.state.step)
        self.watchdog.arm()
        end = run_steps(self, min(t.steps, t.stop_at or t.steps), self.profiler)
        self.watchdog.progress(self.state.step, "save")
        self.checkpointer.wait()  # the last checkpoint is complete before the run reports it
        scores = end.evaluated
        if scores is None and not end.stopped:  # e.g. resumed a finished run: report where the model stands
            log.info("train: no evaluation ran since step %d was reached; evaluating now", self.state.step)
            scores = self.evaluate()
        self.sink.close()
        if self.world.is_main:
            if scores is not None and self.state.step >= t.steps:
                self.task.finish(self.run_dir, scores, self.state.step)
            if t.plot:
                plot_loss(self.run_dir)
        self.watchdog.close()  # the last collective: after it every rank has nothing left to do but exit
        return Summary(self.run_dir, self.state.step, self.state.tokens, scores, time.time() - self.t_start,
                       end.checkpoint, self.task.unigram_entropy_nats, end.stopped)


def train(cfg: Config) -> Summary:
    """Set up a trainer for ``cfg`` and run it to ``train.steps`` (or to a stop signal)."""
    return Trainer(cfg).run()

"""``megalm finetune CKPT --task classify``: fine-tune a pretrained checkpoint to label texts.

The config is the checkpoint's model, fine-tuning's defaults (``TRAIN_DEFAULTS``) and the user's
overrides, with the label list (``finetune.labels``: the training file's unless given) and the base
checkpoint recorded in its ``finetune`` section, so every checkpoint of the run can rebuild the
classifier (``megalm classify``). Set-up: the world → the labelled sets → the ``Classifier`` with
the checkpoint's weights and a fresh seeded head, in pretraining's DeepSpeed engine (AdamW,
clipping, bf16, ZeRO, data parallel) → the checkpointer with the step counters, the data position
and the random streams → resume. The loop: one optimizer step per global batch, metrics every
``train.log_every`` steps, an evaluation every ``train.eval_every``, checkpoints as in pretraining;
at the end RUN_DIR/eval.json (accuracy, per-class and averaged precision/recall/F1, the
majority-class baseline, the confusion matrix), confusion.png and loss.png.

Data parallel only: under tensor or pipeline parallelism no rank holds the pooled hidden state
whole, and the head is not split; those layouts are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.checkpoint import catalog
from megalm.checkpoint.meta import CheckpointMeta
from megalm.checkpoint.shards import CheckpointReader
from megalm.checkpoint.store import FREE_MODEL_KEYS, TOKENIZER, Checkpointer
from megalm.config import Config, ModelConfig, batch_layout, from_dict, load_config, validate
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import EXIT_STOPPED, ConfigError
from megalm.finetune.classifier import Classifier, class_log_probs
from megalm.finetune.labelled import PAD, ClassifyLoader, Record, labelled_set, read_records
from megalm.finetune.metrics import plot_confusion, report
from megalm.observe.metrics import MetricsSink, ProgressBar, Throughput, drop_metrics_after
from megalm.observe.plot import plot_loss
from megalm.parallel.distributed import init_distributed, launched_world_size
from megalm.parallel.mesh import build_mesh
from megalm.records import atomic_write_text
from megalm.train.engine import build_engine, compile_blocks, gradient_norm
from megalm.train.loop import run_steps
from megalm.train.state import RNGState, TrainState

log = logging.getLogger("megalm")

# Fine-tuning moves pretrained weights a little, on a small set: a gentler learning rate, lighter
# weight decay and closer looks than pretraining's defaults. Overrides win.
TRAIN_DEFAULTS = {"run_dir": "runs/classify", "steps": 200, "global_batch": 32, "micro_batch_size": 32,
                  "lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 20, "weight_decay": 0.01, "log_every": 10,
                  "eval_every": 50}


# ---------------------------------------------------------------------------------- the config


def finetune_config(ckpt: str, train_file: str, eval_file: str,
                    overrides: list[str]) -> tuple[Config, list[Record], list[Record]]:
    """The run's config, and the training and evaluation records it was derived from."""
    base, meta = catalog.resolve_verified(ckpt)  # every file checked here; ClassifyRun then reads its weights
    saved = meta.config
    train, evaluation = read_records(train_file), read_records(eval_file)
    # JSON is YAML: the checkpoint's sections go through the overrides' one path of parsing and checking
    sections = {"model": saved["model"], "data": saved["data"], "train": TRAIN_DEFAULTS}
    cfg = load_config(None, [f"{name}={json.dumps(section)}" for name, section in sections.items()] + overrides)
    _check_same_model(cfg.model, from_dict(ModelConfig, saved["model"], "model"), base)
    ft, t = cfg.finetune, cfg.train
    if ft.epochs < 0 or ft.max_len < 0:
        raise ConfigError(f"finetune.epochs, finetune.max_len: must be >= 0, got {ft.epochs} and {ft.max_len}")
    if ft.epochs and any(item.startswith("train.steps=") for item in overrides):
        raise ConfigError("finetune.epochs: give train.steps or finetune.epochs, not both")
    labels = list(ft.labels) or sorted({r.label for r in train})
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"finetune.labels: need at least two distinct labels, got {labels}"
                          + ("" if ft.labels else f" (from {train_file})"))
    cfg = cfg.replace("finetune", task="classify", init_from=str(base), train_file=str(train_file),
                      eval_file=str(eval_file), labels=labels, max_len=ft.max_len or cfg.model.max_seq_len)
    if ft.epochs:
        cfg = cfg.replace("train", steps=math.ceil(ft.epochs * len(train) / t.global_batch))
    validate(cfg)
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(f"parallel.tp, parallel.pp: classification fine-tunes data parallel only (the head reads "
                          f"one pooled hidden state whole); got tp={p.tp} pp={p.pp}, use 1 and 1")
    if cfg.finetune.max_len > cfg.model.max_seq_len:
        raise ConfigError(f"finetune.max_len: {cfg.finetune.max_len} is longer than the model's "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    return cfg, train, evaluation


def _check_same_model(model: ModelConfig, saved: ModelConfig, base: Path) -> None:
    """Overrides may change what does not change the weights' shapes (dropout, kernels, …) only."""
    changed = [f"model.{f.name}={getattr(model, f.name)!r} (the checkpoint has {getattr(saved, f.name)!r})"
               for f in dataclasses.fields(ModelConfig)
               if f.name not in FREE_MODEL_KEYS and getattr(model, f.name) != getattr(saved, f.name)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: fine-tuning keeps the model of {base}")


# ---------------------------------------------------------------------------------- the run


class ClassifyRun:
    """One fine-tuning run for classification, set up in ``__init__`` and trained by ``run``."""

    def __init__(self, cfg: Config, train: list[Record], evaluation: list[Record]):
        self.t_start = time.time()
        validate(cfg, launched_world_size())  # layout errors surface before any process group starts
        self.cfg, ft = cfg, cfg.finetune
        self.world = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
        self.mesh = build_mesh(1, 1, self.world.world_size, self.world.rank)
        self.run_dir = Path(cfg.train.run_dir)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.base = Path(ft.init_from)
        self.tokenizer = self.base / TOKENIZER
        tok = load_tokenizer(self.tokenizer)
        self.train_set = labelled_set(train, tok, ft.labels, ft.max_len)
        self.eval_set = labelled_set(evaluation, tok, ft.labels, ft.max_len)
        # the training set's most frequent label (ties: the first in label order), what a constant guess picks
        self.majority = int(torch.bincount(self.train_set.labels, minlength=len(ft.labels)).argmax())
        self.batch = batch_layout(cfg, self.mesh.dp)
        self.engine = self._build_engine()
        self.state, self.rng = TrainState(), RNGState()
        self.loader = ClassifyLoader(self.train_set, self.batch, self.mesh.dp_rank, cfg.data.seed)
        self.checkpointer = Checkpointer(self.run_dir, self.engine, self.mesh, cfg, self.tokenizer,
                                         shared={"train": self.state, "data": self.loader}, per_rank={"rng": self.rng})
        self._resume()
        self.sink = MetricsSink(cfg, self.run_dir, enabled=self.world.is_main)
        self.throughput = Throughput()
        self.interval: list[torch.Tensor] = []  # per step since the last log: loss, right, examples, tokens

    def _build_engine(self):
        cfg = self.cfg
        RNGState.seed(cfg.train.seed)  # dropout; the head is seeded by its layer id (init_layer)
        model = Classifier(cfg.model, len(cfg.finetune.labels), self.mesh, seed=cfg.train.seed,
                           checkpointing=cfg.parallel.activation_checkpointing)
        model.load_pretrained(CheckpointReader(self.base, CheckpointMeta.read(self.base)).model_state())
        if cfg.train.compile:
            compile_blocks(model)
        engine = build_engine(cfg, model, self.mesh)
        # the summed loss of a micro-batch, scaled so that DeepSpeed's averaging over micro-batches and
        # ranks gives the mean over the global batch exactly (the padding rows count for nothing)
        model.loss_fn.reduction = "sum"
        model.loss_fn.scale = self.mesh.dp * self.batch.grad_accum / self.batch.global_batch
        if self.world.is_main:
            log.info("classify: %d labels %s; %d training and %d evaluation texts of at most %d tokens; from %s "
                     "(model %s, %s)", len(cfg.finetune.labels), cfg.finetune.labels, len(self.train_set),
                     len(self.eval_set), cfg.finetune.max_len, self.base, cfg.model.name, cfg.model.objective)
        return engine

    def _resume(self) -> None:
        """Resume the run dir's own checkpoint (its head must be for these labels), then record the config."""
        root = catalog.checkpoint_root(self.run_dir)
        found = catalog.newest_first(root) if self.cfg.train.resume != "never" else []
        if found:
            saved = CheckpointMeta.read(found[0]).config.get("finetune", {}).get("labels")
            if saved != self.cfg.finetune.labels:
                raise ConfigError(f"finetune.labels: {found[0]} was fine-tuned for {saved}, this run has "
                                  f"{self.cfg.finetune.labels}; keep the training file (or finetune.labels), "
                                  f"or start a new train.run_dir")
        self.checkpointer.resume()
        if self.world.is_main:
            drop_metrics_after(self.run_dir, self.state.step)  # rows of steps the checkpoint lacks are redone
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())

    # ------------------------------------------------------------------------------ phases

    def train_step(self, measure: bool) -> float | None:
        """One optimizer step over this rank's micro-batches; with ``measure``, the gradient norm
        where DeepSpeed does not report it."""
        self.checkpointer.check()  # a background save that failed stops training here
        device, own_grad_norm = self.world.device, None
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, right, examples, tokens
        for ids, labels in self.loader.next_step():
            ids, labels = ids.to(device), labels.to(device)
            loss, logits = self.engine(ids, labels)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                if measure:
                    own_grad_norm = gradient_norm(self.engine, self.mesh)
                self.checkpointer.before_step()  # a save in flight must have copied the weights it changes
            self.engine.step()
            counted = labels >= 0
            totals += torch.stack([loss.detach().double(), (logits.argmax(-1) == labels).sum().double(),
                                   counted.sum().double(), (ids[counted] != PAD).sum().double()])
        dist.all_reduce(totals)
        totals[0] /= self.mesh.dp * self.batch.grad_accum  # the scaled sums add up to dp * grad_accum means
        self.interval.append(totals.cpu())
        self.state.step += 1
        self.state.tokens += int(totals[3])
        self.throughput.add(int(totals[3]))
        return own_grad_norm

    def log_step(self, lr: float, own_grad_norm: float | None, step_time_s: float, bar: ProgressBar) -> None:
        loss, right, examples, _ = torch.stack(self.interval).sum(0).tolist()
        loss /= len(self.interval)
        self.interval.clear()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_grad_norm
        tokens_per_s = self.throughput.rate()
        self.sink.write({"step": self.state.step, "loss": loss, "accuracy": right / examples, "lr": lr,
                         "grad_norm": None if grad_norm is None else float(grad_norm), "epoch": self.loader.epoch,
                         "tokens": self.state.tokens, "tokens_per_s": tokens_per_s, "step_time_s": step_time_s})
        bar.update(self.state.step, loss, lr, tokens_per_s)

    def evaluate(self) -> dict:
        """Collective: the evaluation set's scores, written to the metrics."""
        log_probs = self._eval_log_probs()
        truth = self.eval_set.labels
        scores = report(self.cfg.finetune.labels, truth, log_probs.argmax(-1), self.majority)
        loss = float(-log_probs[torch.arange(len(truth)), truth].mean())
        self.sink.write({"step": self.state.step, "tokens": self.state.tokens, "val_loss": loss,
                         "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro"]["f1"]})
        self.throughput.rate()  # evaluation time is not training throughput
        return {"step": self.state.step, "cross_entropy": loss, **scores}

    def _eval_log_probs(self) -> torch.Tensor:
        """Collective: every data-parallel rank scores every dp-th text, in the same number of equal
        micro-batches (ZeRO-3 needs that; the rows a rank lacks are filled and dropped); all gather."""
        ids, dp, size = self.eval_set.ids, self.mesh.dp, self.batch.micro_batch_size
        per_rank = -(-len(ids) // dp)
        per_rank = -(-per_rank // size) * size
        mine = ids[self.mesh.dp_rank::dp]
        mine = torch.cat([mine, ids[:1].expand(per_rank - len(mine), -1)])
        self.engine.eval()
        try:
            local = class_log_probs(self.engine, mine, size, self.world.device).to(self.world.device)
        finally:
            self.engine.train()
        parts = [torch.empty_like(local) for _ in range(dp)]
        dist.all_gather(parts, local, group=self.mesh.dp_group)
        out = torch.empty(len(ids), local.shape[1])
        for rank, part in enumerate(parts):
            out[rank::dp] = part[:len(out[rank::dp])].cpu()
        return out

    def write_scores(self, scores: dict) -> None:
        """Rank 0: eval.json, confusion.png and loss.png in the run dir."""
        ft = self.cfg.finetune
        record = {"eval_file": ft.eval_file, "train_file": ft.train_file, "init_from": ft.init_from, **scores}
        atomic_write_text(self.run_dir / "eval.json", json.dumps(record, indent=1) + "\n")
        plot_confusion(scores, self.run_dir / "confusion.png",
                       f"{self.run_dir.name}, step {scores['step']}\naccuracy {scores['accuracy']:.3f} "
                       f"(majority baseline {scores['majority_baseline']['accuracy']:.3f})")
        plot_loss(self.run_dir)

    # ------------------------------------------------------------------------------ the loop

    def save(self) -> Path:
        """Collective: a checkpoint of the engine, the step counters, the data position and random streams."""
        path = self.checkpointer.save(self.state.step)
        self.throughput.rate()
        return path

    def run(self) -> dict | None:
        """Train to ``train.steps`` (or ``train.stop_at``, or a stop signal); the final scores (also
        written to eval.json), or None when the run stopped before its end."""
        t = self.cfg.train
        last = min(t.steps, t.stop_at or t.steps)
        if self.world.is_main:
            b = self.batch
            log.info("classify: %d steps of %d texts (%d ranks x %d micro-batches of %d%s), from step %d (epoch %.2f)",
                     t.steps, b.global_batch, b.dp, b.grad_accum, b.micro_batch_size,
                     f", {b.padding} padding" if b.padding else "", self.state.step, self.loader.epoch)
        end = run_steps(self, last)
        self.stopped, scores = end.stopped, end.evaluated
        self.checkpointer.wait()  # the last checkpoint is complete before the run reports
        if self.state.step < t.steps:
            scores = None  # stopped before the end: the scores so far are in metrics.jsonl
        elif scores is None:  # a finished run run again: report where it stands
            scores = self.evaluate()
        if scores is not None and self.world.is_main:
            self.write_scores(scores)
        self.sink.close()
        return scores


def main(args) -> int:
    if not args.train or not args.eval:
        raise ConfigError("megalm finetune --task classify: give --train FILE.jsonl and --eval FILE.jsonl")
    cfg, train, evaluation = finetune_config(args.ckpt, args.train, args.eval, args.overrides)
    run = ClassifyRun(cfg, train, evaluation)
    scores = run.run()
    if scores is None:
        if run.world.is_main:
            print(f"classify: stopped at step {run.state.step} of {cfg.train.steps}; run the same command again to "
                  f"go on")
        return EXIT_STOPPED if run.stopped else 0  # a signal's stop, or train.stop_at's
    if not run.world.is_main:
        return 0
    base = scores["majority_baseline"]
    print(f"classify: {scores['step']} steps in {time.time() - run.t_start:.0f}s; scored {scores['examples']} "
          f"texts of {cfg.finetune.eval_file}\n"
          f"  accuracy      {scores['accuracy']:.3f}  (majority baseline {base['accuracy']:.3f}: always {base['label']!r})\n"
          f"  macro-F1      {scores['macro']['f1']:.3f}  (weighted-F1 {scores['weighted']['f1']:.3f})\n"
          f"  run dir       {run.run_dir}  (eval.json, confusion.png, metrics.jsonl, loss.png, checkpoints/)\n"
          f"predict: megalm classify {run.run_dir} --text '...'  or  --input FILE.jsonl")
    return 0

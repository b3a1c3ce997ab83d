"""Saving and resuming training: every stateful part's state, on any layout, never torn.

The checkpointer knows nothing of the parts' insides. It is handed the engine (whose model and
optimizer state it saves as layout-independent fragments: fragments.py) and two sets of objects
with ``state_dict()``/``load_state_dict()``: the *shared* parts (one state for the whole run, e.g.
step counters and the data position; ``state_dict`` may be collective) and the *per-rank* parts
(one state per rank, e.g. random streams).

A save (collective) copies this rank's fragments into a reusable host buffer (the only time
training waits), then a background thread writes the rank's files with checksums, fsyncs them and
drops a marker. Rank 0's thread waits for every rank's marker, writes ``meta.json`` (every file's
size and checksum), fsyncs, renames ``.tmp.step_N`` to ``step_N`` and only then moves ``latest``.
The next save waits for the previous one; a failed background write is raised at the next step.
With ``train.async_save=false`` the same work runs before ``save`` returns.

Resuming (collective) takes the newest checkpoint whose files all verify (every rank checksums a
share of them), checks that the model and tokenizer are the same, and puts every fragment back,
reassembled for this run's layout when it differs from the saved one. A run that has no
checkpoint of its own may instead start from another run's (``train.init_from``): its weights, and
if asked its optimizer and step count, but never its data position (continued pretraining on other
data). ``run_config`` builds such a run's config, and ``megalm eval``'s, from the checkpoint's.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megalm_kernels.provenance import git_commit

from megalm.checkpoint import catalog
from megalm.checkpoint.fragments import Fragment, adam_step, ensure_optimizer_state, local_slots
from megalm.checkpoint.meta import CheckpointMeta, FileEntry, Layout
from megalm.checkpoint.held import HeldSave
from megalm.checkpoint.shards import KINDS, CheckpointReader, rank_index, write_file, write_rank
from megalm.checkpoint.staging import Staging
from megalm.common import checksum
from megalm.config import Config, load_config
from megalm.data.location import Location
from megalm.data.tokenizer import load_tokenizer, tokenizer_hash
from megalm.errors import CheckpointError, ConfigError
from megalm.model.transformer import one_process_names
from megalm.parallel.mesh import Mesh
from megalm.records import atomic_write_text, fsync_dir

log = logging.getLogger("megalm.checkpoint")

TOKENIZER = "tokenizer.json"
COMMIT_TIMEOUT_S = 3600  # how long rank 0 waits for the other ranks' files before giving up on a save
# model fields a resumed run may change: they do not change the function the weights compute
FREE_MODEL_KEYS = {"name", "dropout", "init_std", "kernels", "mask_prob", "mask_token_share", "mask_random_share"}
STEP_PART = "train"  # the shared part whose state holds the step count (the trainer's TrainState)
_LOADING = {"all": "resume: from", "optimizer": "init: weights, Adam moments and step count from",
            "weights": "init: weights from"}  # what a log line says of each way to load a checkpoint


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class SaveStats:
    step: int
    stall_s: float  # how long training waited (staging copy, shared state)
    staged_bytes: int  # this rank's share
    write_s: float | None = None  # start of the save to its commit (rank 0; None until committed)


class Checkpointer:
    """Saves and restores one run's engine and parts under ``RUN_DIR/checkpoints``."""

    def __init__(self, run_dir: str | Path, engine, mesh: Mesh, cfg: Config, tokenizer: Path, *,
                 shared: dict[str, Stateful], per_rank: dict[str, Stateful]):
        self.root = catalog.checkpoint_root(run_dir)
        self.tokenizer = tokenizer  # the data's, saved with every checkpoint
        self.engine, self.mesh, self.cfg = engine, mesh, cfg
        self.layout = Layout(tp=mesh.tp, pp=mesh.pp, dp=mesh.dp, zero_stage=cfg.train.zero_stage)
        self.shared, self.per_rank = shared, per_rank
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.names = one_process_names(engine.module)
        self.staging = Staging()
        t = cfg.train
        self.held = HeldSave(engine, mesh, self.names) if t.rollback_copy and t.max_rollbacks else None
        self.protected: set[Path] = set()  # never removed by retention (the checkpoint resumed from)
        self.last: SaveStats | None = None
        self._thread: threading.Thread | None = None
        self._snapshot = None  # the staging copy of the save in flight, until it is complete
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------ saving

    def save(self, step: int) -> Path:
        """Collective. Returns where the checkpoint will be once complete (``wait()``)."""
        started = time.perf_counter()
        self.wait()  # the previous save reuses the staging buffer
        shared = {name: part.state_dict() for name, part in self.shared.items()}
        tmp = self.root / f"{catalog.TMP}{catalog.tag(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
            tmp.mkdir(parents=True)
        dist.barrier()
        slots = local_slots(self.engine, self.mesh, self.names, saving=True)
        parts = {name: part.state_dict() for name, part in self.per_rank.items()}
        first = self.last is None
        # the copies run until the next optimizer step needs the tensors: the held copy, which the
        # files are written from, or else the save's own
        self._snapshot = self._hold(step, shared, parts, first)
        from_held = self._snapshot is not None
        if from_held:
            self.staging.buffer = None
        else:
            self._snapshot = self.staging.start([slot.read() for slot in slots])
        fragments, offset = [], 0
        for slot in slots:  # where each fragment's master and moments lie in the rank's data file
            fragments.append(replace(slot.fragment, offset=offset))
            offset += KINDS * slot.fragment.numel
        if first and self.rank == 0:
            how = "written in the background" if self.cfg.train.async_save else "written before training goes on"
            if from_held:
                log.info("checkpoint: a save copies what this rank holds into host memory (%.1f MB on rank 0: "
                         "fp32 masters, Adam moments%s), writes its files from that copy and keeps it, so that a "
                         "rollback to it reads no file (train.rollback_copy); %s", self.held.staging.nbytes / 1e6,
                         ", the 16-bit weights" if self.cfg.train.zero_stage in (1, 2) else "", how)
            else:
                log.info("checkpoint: staging buffer of %.1f MB per rank (rank 0's fp32 masters and Adam moments; "
                         "allocated once, reused by every save); %s", self.staging.nbytes / 1e6, how)
        self.last = SaveStats(step, time.perf_counter() - started, 4 * offset)
        self._error = None
        written = [f.name for f in fragments] if from_held else None
        self._thread = threading.Thread(target=self._write, args=(tmp, step, adam_step(self.engine), fragments, parts,
                                                                  shared, started, written),
                                        name=f"megalm-save-{step}", daemon=True)
        self._thread.start()
        if not self.cfg.train.async_save:
            self.wait()
            dist.barrier()  # every rank returns with the checkpoint complete
        return self.root / catalog.tag(step)

    @property
    def host_copy_bytes(self) -> int:
        """The host memory this rank's saves copy into (the held copy, or the save's own staging)."""
        return self.staging.nbytes + (self.held.staging.nbytes if self.held is not None else 0)

    def _hold(self, step: int, shared: dict, parts: dict, first: bool):
        """The newest save held in host memory, for a rollback to it (held.py): the copy's snapshot,
        or None where no copy is held."""
        if self.held is None:
            return None
        refused_before = self.held.refused is not None
        snapshot = self.held.start(step, adam_step(self.engine), shared, parts, spare=self.staging.nbytes)
        if snapshot is None and not refused_before:  # (said once, not at every save)
            log.warning("checkpoint: rank %d holds no copy of the newest save in host memory: %s; a rollback will "
                        "read the checkpoint's files", self.rank, self.held.refused)
        return snapshot

    def _write(self, tmp: Path, step: int, adam: int, fragments: list[Fragment], parts: dict, shared: dict,
               started: float, written: list[str] | None) -> None:
        """In the save's thread: copy (held.py's copy when ``written`` names what to write from it,
        else the save's own), write this rank's files, and on rank 0 commit."""
        try:
            if written is not None:
                self.held.finish()
                values = self.held.written(written)
            else:
                self.staging.finish()
                values = [self.staging.buffer]
            files = write_rank(tmp, self.rank, values, rank_index(fragments, adam, parts))
            atomic_write_text(tmp / _marker(self.rank), json.dumps({k: vars(v) for k, v in files.items()}))
            if self.rank == 0:
                self._commit(tmp, step, shared)
                self.last.write_s = time.perf_counter() - started
                log.info("checkpoint %s: training waited %.3f s; written and committed in %.2f s (%.1f MB from "
                         "this rank, staged in host memory)", catalog.tag(step), self.last.stall_s,
                         self.last.write_s, self.last.staged_bytes / 1e6)
        except BaseException as e:  # kept for the training loop to raise: never a silent loss
            self._error = e
            (self.staging if written is None else self.held).abandon()

    def _commit(self, tmp: Path, step: int, shared: dict) -> None:
        """Rank 0: once every rank's files are on disk, make the checkpoint complete, then ``latest``."""
        files: dict[str, FileEntry] = {}
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        for rank in range(self.world):
            while not (tmp / _marker(rank)).is_file():
                if time.monotonic() > deadline:
                    raise CheckpointError(f"{tmp}: rank {rank} did not finish writing within {COMMIT_TIMEOUT_S} s")
                time.sleep(0.01)
            files.update({k: FileEntry(**v) for k, v in json.loads((tmp / _marker(rank)).read_text()).items()})
        files[TOKENIZER] = write_file(tmp / TOKENIZER, self.tokenizer.read_bytes())
        CheckpointMeta(
            step=step, layout=self.layout, config=self.cfg.to_dict(), state=shared, optimizer=True,
            tokenizer_sha256=tokenizer_hash(self.tokenizer), files=files,
            versions=versions(), git_commit=git_commit(),
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ).write(tmp)
        for rank in range(self.world):
            (tmp / _marker(rank)).unlink()
        fsync_dir(tmp)
        final = self.root / catalog.tag(step)
        if final.exists():  # the same step saved again (e.g. a finished run resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / catalog.LATEST, final.name)
        t = self.cfg.train
        doomed = catalog.to_delete(self.root, step, t.keep_checkpoints, t.keep_every, self.protected)
        if doomed:  # deleting is no part of saving: nobody waits for it
            threading.Thread(target=_remove, args=(doomed, t.keep_checkpoints, t.keep_every), daemon=True).start()

    def before_step(self) -> None:
        """Training is about to change the weights: a save in flight must have copied them."""
        if self._snapshot is not None:
            waited = self._snapshot.wait()
            self._snapshot = None
            if self.last is not None:
                self.last.stall_s += waited
        self.check()

    def check(self) -> None:
        """Raise the error of a background save that failed."""
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"saving {self.last and catalog.tag(self.last.step)} failed on rank {self.rank}: "
                                  f"{type(error).__name__}: {error}") from error

    def wait(self) -> None:
        """Block until the save in flight (this rank's part; on rank 0 its commit) is done."""
        self.before_step()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    # ------------------------------------------------------------------------------ resuming

    def resume(self) -> CheckpointMeta | None:
        """Collective: restore the newest valid checkpoint (see ``train.resume``), or when the run
        has none, start from ``train.init_from``; returns the meta of the checkpoint loaded."""
        t = self.cfg.train
        chosen = [None, None]  # checkpoints to resume from, newest first; the one to start from
        if self.rank == 0:
            found = catalog.newest_first(self.root) if t.resume != "never" else []
            if not found and t.resume not in ("auto", "never"):
                found = [catalog.resolve(t.resume)]
            chosen = [found, catalog.resolve(t.init_from) if t.init_from and not found else None]
        dist.broadcast_object_list(chosen, src=0)
        candidates, init = chosen
        for ckpt in candidates:
            meta, problem = self._verified(ckpt)
            if problem:
                log.warning("checkpoint: cannot resume from %s: %s; trying the previous one", ckpt.name, problem)
                continue
            self._check_compatible(ckpt, meta, "train.resume", "all")
            self._load(ckpt, meta, "all")
            if ckpt.parent == self.root:
                self.protected.add(ckpt)
            return meta
        if candidates:
            raise CheckpointError(f"{self.root}: none of the {len(candidates)} checkpoints verifies (see above); "
                                  f"repair or remove them, or start over with train.resume=never")
        if init is not None:
            return self.load(init, "optimizer" if t.init_keep_optimizer else "weights", "train.init_from")
        return None

    def load(self, ckpt: Path, keep: str, key: str) -> CheckpointMeta:
        """Collective: put back ``keep`` of the checkpoint that config key ``key`` names: ``all``
        (a resume: see ``_load``), ``optimizer`` (the weights, Adam's moments and step, and the step
        count, so the LR schedule goes on from there; not the data position or the random streams)
        or ``weights`` (fresh Adam moments, step 0)."""
        meta, problem = self._verified(ckpt)
        if problem:
            raise CheckpointError(f"{key}: {ckpt} is damaged: {problem}")
        self._check_compatible(ckpt, meta, key, keep)
        step = _step(meta)
        if keep == "optimizer" and step >= self.cfg.train.steps:
            raise ConfigError(f"train.steps: with train.init_keep_optimizer the step count goes on from {ckpt}'s "
                              f"step {step}, and train.steps={self.cfg.train.steps} is the step to end at; give a "
                              f"later one, e.g. train.steps={step + self.cfg.train.steps}")
        self._load(ckpt, meta, keep)
        return meta

    def roll_back(self, ckpt: Path) -> str:
        """Collective: back to checkpoint ``ckpt`` of this run, all of it (a resume in the same
        process), which ``latest`` then names: a restart from here takes the same way back. From
        the copy every rank holds in memory when ``ckpt`` is the newest save (held.py), else from
        its files; returns which, and why."""
        self.wait()
        held = [None] * self.world
        dist.all_gather_object(held, None if self.held is None else (self.held.step, self.held.refused))
        step = catalog.step_of(ckpt)
        if all(h is not None and h[0] == step for h in held):
            shared, parts = self.held.put_back()
            self._restore_schedule(shared[STEP_PART]["step"])
            for name, part in self.shared.items():
                part.load_state_dict(shared[name])
            for name, part in self.per_rank.items():
                part.load_state_dict(parts[name])
            source = "its copy held in memory"
        else:
            self.load(ckpt, "all", "rollback")
            source = "its files (" + _why_not_held(held, step) + ")"
        if self.rank == 0:
            atomic_write_text(self.root / catalog.LATEST, ckpt.name)
        return source

    def _verified(self, ckpt: Path) -> tuple[CheckpointMeta | None, str | None]:
        """Collective: every rank checksums a share of the files; the first problem, if any."""
        try:
            meta, found = CheckpointMeta.read(ckpt), []
            found = catalog.problems(ckpt, meta, sorted(meta.files)[self.rank::self.world])
        except CheckpointError as e:
            meta, found = None, [str(e)]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, found)
        found = [p for part in everyone for p in part]
        return meta, (found[0] if found else None)

    def _check_compatible(self, ckpt: Path, meta: CheckpointMeta, key: str, keep: str) -> None:
        """The model and the tokenizer must be the saved ones (a new run from another's weights may
        change the head: a classifier from a language model); a resume lists the other changes."""
        saved, now = _flatten(meta.config), _flatten(self.cfg.to_dict())
        differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        free = FREE_MODEL_KEYS if keep == "all" else FREE_MODEL_KEYS | {"labels"}
        shape = {k: v for k, v in differ.items() if k.startswith("model.") and k.split(".")[1] not in free}
        if shape:
            free = ", ".join(f"model.{k}" for k in sorted(FREE_MODEL_KEYS))
            fix = "resume with its model settings, or start a new run_dir" if key == "train.resume" else \
                f"keep its model settings (only {free} may change)"
            raise ConfigError(f"{key}: {ckpt} holds another model ("
                              + ", ".join(f"{k}={new!r} here, {old!r} there" for k, (old, new) in shape.items())
                              + f"); {fix}")
        check_tokenizer(ckpt, meta, tokenizer_hash(self.tokenizer), self.tokenizer, key)
        if differ and meta.state and key == "train.resume" and self.rank == 0:  # (an imported model has no run)
            log.info("resume: config changes since %s: %s", ckpt.name,
                     "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items()))

    def _load(self, ckpt: Path, meta: CheckpointMeta, keep: str) -> None:
        """Put back ``keep`` of a verified checkpoint (see ``load``), reassembled for this layout."""
        reader = CheckpointReader(ckpt, meta)
        same = meta.layout == self.layout
        if self.rank == 0:
            log.info("%s %s (step %d, layout %s%s)", _LOADING[keep], ckpt, meta.step, meta.layout,
                     "" if same else f", reassembled for {self.layout}")
            if keep == "optimizer" and not meta.optimizer:
                log.info("init: %s holds no optimizer state; Adam's moments start at zero", ckpt.name)
        moments = meta.optimizer and keep != "weights"
        ensure_optimizer_state(self.engine, reader.adam_step if moments else 0)
        new = self._new_parameters(ckpt, reader, keep)
        for slot in local_slots(self.engine, self.mesh, self.names, saving=False):
            if slot.fragment.name in new:
                continue  # keeps its seeded initial value; its moments start at zero
            values = reader.local(slot.fragment.name, getattr(slot.p, "shard", None), self.mesh.tp_rank, self.mesh.tp)
            # without optimizer state (an imported model), or when not kept, the moments are zeros
            slot.write(values[0], values[1:] if moments else [torch.zeros_like(v) for v in values[1:]])
        self._restore_schedule(0 if keep == "weights" else _step(meta))
        if keep == "optimizer" and STEP_PART in self.shared and STEP_PART in meta.state:
            self.shared[STEP_PART].load_state_dict(meta.state[STEP_PART])
        if keep != "all":
            return
        for name, part in self.shared.items():
            if name in meta.state:
                part.load_state_dict(meta.state[name])
            elif self.rank == 0:
                log.info("resume: %s holds no %s state; it starts fresh", ckpt.name, name)
        saved = reader.parts(self.rank) if same else {}
        for name, part in self.per_rank.items():
            if name in saved:
                part.load_state_dict(saved[name])
            elif self.rank == 0:
                log.info("resume: %s has no %s state for this layout (%s); it starts from the seed", ckpt.name,
                         name, "the layout changed" if not same else "none was saved")

    def _new_parameters(self, ckpt: Path, reader: CheckpointReader, keep: str) -> set[str]:
        """Collective: this rank's parameters that ``ckpt`` lacks. A resume needs every one; a new run
        from another's weights may add some (a classifier's head) and leave some of the checkpoint's
        unused (a language model's head): rank 0 says which, for the whole model."""
        ours, theirs = set(self.names.values()), set(reader.names())
        everyone = [None] * self.world
        dist.all_gather_object(everyone, sorted(ours))  # a pipeline stage holds only its own layers
        model = set().union(*everyone)
        if keep == "all" and model - theirs:
            raise CheckpointError(f"{ckpt}: holds no values for {', '.join(sorted(model - theirs))}: not a checkpoint "
                                  f"of this model")
        if self.rank == 0 and model - theirs:
            log.info("init: new parameters, not in %s (seeded afresh): %s", ckpt.name, ", ".join(sorted(model - theirs)))
        if self.rank == 0 and theirs - model:
            log.info("init: parameters of %s this model has no use for: %s", ckpt.name, ", ".join(sorted(theirs - model)))
        return ours - theirs

    def _restore_schedule(self, step: int) -> None:
        """The engine's counters and the learning rate of step ``step`` (the schedule is a function
        of the step and the config, so a changed schedule applies from here on)."""
        e = self.engine
        e.global_steps, e.micro_steps = step, step * e.gradient_accumulation_steps()
        e.global_samples = step * e.train_batch_size()
        sched = e.lr_scheduler
        sched.last_epoch, sched._step_count = step, step + 1
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(step)


def _why_not_held(held: list, step: int) -> str:
    """Why a rollback to step ``step`` reads files: ``held`` is each rank's (step held, why none)."""
    for rank, h in enumerate(held):
        if h is None:
            return "train.rollback_copy=false"
        at, refused = h
        if refused:
            return f"rank {rank} holds no copy: {refused}"
        if at != step:
            return f"the copy held in memory is of {catalog.tag(at)}" if at is not None else \
                "no save of this process to go back to"
    return ""


def _step(meta: CheckpointMeta) -> int:
    """The optimizer steps the run that saved ``meta`` had taken (0 for an imported model)."""
    return meta.state.get(STEP_PART, {}).get("step", 0)


def check_tokenizer(ckpt: Path, meta: CheckpointMeta, data_hash: str, data_tokenizer: str | Path, key: str) -> None:
    """The data (whose tokenizer ``data_tokenizer`` hashes to ``data_hash``) must be tokenized as
    the checkpoint's model was trained: token ids mean nothing under another tokenizer."""
    if data_hash != meta.tokenizer_sha256:
        raise ConfigError(f"{key}: {ckpt} was trained with another tokenizer ({ckpt / TOKENIZER}) than the data's "
                          f"({data_tokenizer}); prepare the data with the checkpoint's: megalm prepare "
                          f"data.tokenizer={ckpt / TOKENIZER} data.source=... data.dir=...")


def _remove(doomed: list[Path], keep_last: int, keep_every: int) -> None:
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: removed %s (keeping the newest %d%s)", old.name, keep_last,
                 f" and every {keep_every}th step" if keep_every else "")


def _marker(rank: int) -> str:
    return f"rank_{rank:05d}.done"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def versions() -> dict[str, str]:
    import deepspeed

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megalm": importlib.metadata.version("megalm")}


def save_weights(out: Path, cfg: Config, state: dict[str, torch.Tensor], tokenizer: Path) -> Path:
    """A checkpoint of a model's weights alone (no optimizer, step or data state), as written by
    one process, plus ``model.yaml`` (its model config, for a run to name). Training started from
    it (``train.resume=OUT``) begins at step 0 with fresh Adam moments, on any layout."""
    import yaml

    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fragments, offset = [], 0
    for name, tensor in state.items():
        fragments.append(Fragment(name=name, tp_rank=0, tp=1, shard_dim=-1, shard_parts=(), shape=tuple(tensor.shape),
                                  start=0, numel=tensor.numel(), offset=offset))
        offset += tensor.numel()
    values = [t.reshape(-1).float().contiguous() for t in state.values()]
    files = write_rank(tmp, 0, values, rank_index(fragments, 0, {}, kinds=1))
    load_tokenizer(tokenizer).save(str(tmp / TOKENIZER))  # canonical form, as `megalm prepare` saves it
    files[TOKENIZER] = FileEntry(size=(tmp / TOKENIZER).stat().st_size, xxh3=checksum(tmp / TOKENIZER))
    CheckpointMeta(
        step=0, layout=Layout(tp=1, pp=1, dp=1, zero_stage=0), config=cfg.to_dict(), state={}, optimizer=False,
        tokenizer_sha256=tokenizer_hash(tmp / TOKENIZER), files=files, versions=versions(), git_commit=git_commit(),
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    ).write(tmp)
    (tmp / "model.yaml").write_text(yaml.safe_dump(cfg.to_dict()["model"], sort_keys=False))
    fsync_dir(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


# the train.* keys that belong to the run that saved a checkpoint, not to a run starting from it
RUN_OWN_KEYS = {"task", "run_dir", "resume", "init_from", "init_keep_optimizer", "stop_at", "profile"}


def run_config(ckpt: Path, overrides: list[str], data_dir: str | None = None) -> Config:
    """The config of a new run on checkpoint ``ckpt``'s model (``megalm finetune``, ``megalm eval``):
    its model, its sequence length and its ``train.*`` settings but those in RUN_OWN_KEYS; with
    ``data_dir``, that prepared directory (which must hold data tokenized with the checkpoint's
    tokenizer: checked here, before any process group starts) with its sequence length at most the
    model's; the default parallel layout (the launch's); then ``overrides``."""
    meta = CheckpointMeta.read(ckpt)
    saved = meta.config
    model = saved["model"]
    train = {k: v for k, v in saved["train"].items() if k not in RUN_OWN_KEYS}
    data = {"seq_len": min(saved["data"]["seq_len"], model["max_seq_len"])}
    if data_dir is not None:
        data["dir"] = str(data_dir)
    # JSON is YAML: the checkpoint's sections go through the overrides' one path of parsing and checking
    cfg = load_config(None, [f"model={json.dumps(model)}", f"train={json.dumps(train)}", f"data={json.dumps(data)}",
                             *overrides])
    if data_dir is not None:
        d = cfg.data
        manifest = Location(d.dir, d.shards, d.cache_dir).manifest()
        check_tokenizer(ckpt, meta, manifest.tokenizer_hash, f"{d.dir}/{manifest.tokenizer}", "data.dir")
    return cfg

"""What ``megalm eval CKPT --data DIR`` does: a checkpoint's loss, perplexity and bits per byte on a
prepared directory's held-out split, on any parallel layout.

The checkpoint brings its model config and tokenizer (``run_config``); the data must have been
prepared with that tokenizer. The world, engine and weights are set up as training sets them up
(the trainer's mesh, DeepSpeed engine and checkpointer, so any layout reads any checkpoint), and
the sequences are scored by training's own ``score``: the exact mean over every sequence, split
over data-parallel ranks. Bits per byte divide the summed loss by the UTF-8 bytes of the scored
tokens' text, so that models with different tokenizers compare fairly. A masked LM is scored on
the validation sequences' evaluation masks (the ones training's evaluation uses), with its
masked-token accuracy; its loss, perplexity and bits per byte are over the masked tokens only, so
they compare masked models with each other, not with causal ones. Rank 0 prints a table and
appends the result to the run's metrics.jsonl (as ``eval_*`` keys) and, if asked, to a JSON file,
having checked before scoring that both can be written.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megalm.checkpoint import catalog
from megalm.checkpoint.store import Checkpointer
from megalm.common import IGNORE
from megalm.config import Config, resolve
from megalm.data.dataset import TrainSource, open_sources
from megalm.data.loader import VAL_TOKEN_CAP, validation_sequences
from megalm.data.tokenizer import load_tokenizer, token_byte_lengths
from megalm.errors import DataError, MegalmError, UsageError
from megalm.observe.metrics import finite, metrics_line
from megalm.train.engine import build_engine, build_model
from megalm.train.evaluate import score
from megalm.train.objective import EVAL_STEP, build_objective
from megalm.train.trainer import start_world

log = logging.getLogger("megalm")

MOMENT_S = 1.0  # scoring that takes longer than this shows a progress bar


@dataclass
class Result:
    checkpoint: str
    step: int
    data: str
    sequences: int
    tokens: int  # labels scored
    bytes: int | None  # UTF-8 bytes of those labels' text (None: the tokenizer is not byte-level)
    loss: float  # mean nats per scored token
    layout: str
    accuracy: float | None  # masked LM: share of the masked tokens predicted exactly

    def numbers(self) -> dict:
        """Every field, and perplexity, bits per token and bits per byte."""
        bits = self.loss / math.log(2)
        return {**asdict(self), "ppl": math.exp(self.loss), "bits_per_token": bits,
                "bpb": bits * self.tokens / self.bytes if self.bytes else None}


def evaluate_checkpoint(ckpt: Path, cfg: Config, capped: bool) -> Result:
    """Collective: score ``ckpt`` on the validation split of ``data.dir``, all of it (at most
    VAL_TOKEN_CAP tokens) unless ``capped`` to ``data.eval_sequences``."""
    world, mesh = start_world(cfg)
    sources = open_sources(cfg.data, cfg.train.global_batch)
    cfg = resolve(cfg, world.world_size, tokenizer_vocab=sources[0].manifest.vocab_size)  # covers the data's?
    tokenizer = sources[0].location.local_file(sources[0].manifest.tokenizer)
    engine = build_engine(cfg, build_model(cfg, mesh), mesh)
    checkpointer = Checkpointer(ckpt.parent, engine, mesh, cfg, tokenizer, shared={}, per_rank={})  # never saves
    meta = checkpointer.load(ckpt, "weights", "data.dir")
    count = cfg.data.eval_sequences if capped else whole_split(sources[0])
    val = validation_sequences(sources, count, Path(cfg.data.cache_dir or sources[0].location.cache) / "spool")
    objective = build_objective(cfg, tokenizer)
    with ProgressBar(enabled=world.is_main and cfg.train.progress) as bar:
        scores = score(engine, val, mesh, cfg.train.micro_batch_size, world.device, objective,
                       accuracy=objective.masked, progress=bar.track)
    return Result(str(ckpt), meta.step, cfg.data.dir, len(val), scores.tokens,
                  scored_bytes(val, objective, tokenizer), scores.loss, str(checkpointer.layout), scores.accuracy)


def whole_split(source: TrainSource) -> int:
    """Full sequences in the validation split (of its first VAL_TOKEN_CAP tokens, which is all that
    ``validation_sequences`` reads)."""
    tokens = sum(shard.tokens + shard.samples for shard in source.manifest.val)  # documents and their end-of-text
    return min(tokens, VAL_TOKEN_CAP) // (source.seq_len + 1)


def scored_bytes(val: torch.Tensor, objective, tokenizer: Path) -> int | None:
    """UTF-8 bytes of the text of the labels that ``score`` counts under ``objective`` (None, with a
    warning, when the tokenizer is not byte-level)."""
    try:
        lengths = torch.from_numpy(token_byte_lengths(load_tokenizer(tokenizer)))
    except DataError as e:
        log.warning("eval: no bits per byte for %s: %s", tokenizer, e)
        return None
    _, labels = objective.examples(val, None, EVAL_STEP, torch.arange(len(val)))
    return int(lengths[labels[labels != IGNORE]].sum())


class ProgressBar:
    """A bar over this rank's micro-batches as they are scored, on stderr (stdout holds the table),
    shown only once scoring has taken more than a moment."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def track(self, batches: list) -> Iterator:
        started = time.perf_counter()
        for done, batch in enumerate(batches, 1):
            yield batch
            if self.enabled and self.bar is None and time.perf_counter() - started > MOMENT_S:
                self.bar = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True),
                                    transient=True)
                self.task = self.bar.add_task("eval", total=len(batches))
                self.bar.start()
            if self.bar is not None:
                self.bar.update(self.task, completed=done)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def table(result: dict) -> str:
    """What ``megalm eval`` prints: the checkpoint, then a header and a row of numbers."""
    cells = {"data": result["data"], "sequences": f"{result['sequences']:,}", "tokens": f"{result['tokens']:,}",
             "bytes": _number(result["bytes"], ","), "loss": f"{result['loss']:.4f}", "ppl": f"{result['ppl']:.2f}",
             "bits/token": f"{result['bits_per_token']:.4f}", "bits/byte": _number(result["bpb"], ".4f"),
             **({} if result["accuracy"] is None else {"accuracy": f"{result['accuracy']:.4f}"}),
             "layout": result["layout"]}
    width = {k: max(len(k), len(v)) for k, v in cells.items()}

    def line(values: dict) -> str:  # text to the left, numbers to the right
        cells = (v.ljust(width[k]) if k in ("data", "layout") else v.rjust(width[k]) for k, v in values.items())
        return "  ".join(cells).rstrip()

    return f"checkpoint {result['checkpoint']} (step {result['step']})\n{line({k: k for k in cells})}\n{line(cells)}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_metrics(ckpt: Path) -> Path | None:
    """The metrics.jsonl of the run the checkpoint belongs to, if it is a run's and has one."""
    run_dir = ckpt.parent.parent
    metrics = run_dir / "metrics.jsonl"
    return metrics if ckpt.parent == catalog.checkpoint_root(run_dir) and metrics.is_file() else None


def check_writable(ckpt: Path, json_file: str | None) -> None:
    """Every file ``record`` writes can be opened for writing (appending, which changes nothing; a
    file this makes is removed again), so that a failure comes before the scoring and leaves no
    output half written: not the run's metrics with an eval row and then no JSON file."""
    targets = [(Path(json_file), UsageError, f"--json {json_file}", "give a file in a writable directory")] \
        if json_file else []
    if (metrics := run_metrics(ckpt)) is not None:
        targets.append((metrics, MegalmError, str(metrics), "eval appends its result there; make it writable"))
    for path, error, what, fix in targets:
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise error(f"{what}: cannot be written ({e.strerror}); {fix}") from None
        if not existed:
            path.unlink()


def record(result: dict, ckpt: Path, json_file: str | None) -> None:
    """Write ``json_file`` and append the result to the metrics of the run the checkpoint belongs to
    (if any) as ``eval_*`` keys at its step, so ``megalm plot RUN --metric eval_loss`` draws them.
    The JSON file goes first: should it fail even so, the run's metrics are as they were."""
    if json_file:
        Path(json_file).write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    if (metrics := run_metrics(ckpt)) is not None:
        row = {"step": result["step"], **{f"eval_{k}": v for k, v in result.items() if k not in ("step", "checkpoint")}}
        with open(metrics, "a") as f:  # as MetricsSink appends, without a wandb run for one row
            f.write(metrics_line(row))
        log.info("eval: appended to %s", metrics)

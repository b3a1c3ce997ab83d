"""``train.task=classify``: fine-tune a pretrained checkpoint (``train.init_from``) to label texts.

The model is the checkpoint's with a classifier head (``model.labels``: the training file's labels,
sorted, unless given), trained on ``classify.train_file`` and scored on ``classify.eval_file``:
accuracy, per-class and averaged precision/recall/F1, the majority-class baseline and the confusion
matrix (megalm.observe.classification), in metrics.jsonl at every evaluation and, at the end, in
RUN_DIR/eval.json and confusion.png. Texts are tokenized with the checkpoint's tokenizer, cut to
``classify.max_len`` tokens. Any layout: the head reads the final hidden states on the last
pipeline stage, gathering the sequence under sequence parallelism; scoring collects each text's
class log-probabilities in the loss function, the one place every layout has the logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.checkpoint import catalog
from megalm.checkpoint.store import TOKENIZER
from megalm.common import IGNORE
from megalm.config import BatchLayout, Config, resolve
from megalm.data.labelled import ClassifyLoader, labelled_set, read_records, targets, trim
from megalm.data.tokenizer import load_tokenizer
from megalm.observe.classification import plot_confusion, report
from megalm.parallel.distributed import World
from megalm.parallel.mesh import Mesh
from megalm.records import atomic_write_text
from megalm.train.evaluate import forward_only, loss_rank, per_rank_rows

log = logging.getLogger("megalm")

class Classification:
    source_names: list[str] = []
    unigram_entropy_nats = None

    def __init__(self, cfg: Config, world: World):
        c = cfg.classify
        self.base = catalog.resolve(cfg.train.init_from)
        self.tokenizer = self.base / TOKENIZER
        self.train_texts, self.eval_texts = read_records(c.train_file), read_records(c.eval_file)

    def resolve(self, cfg: Config, world_size: int) -> Config:
        tok = load_tokenizer(self.tokenizer)
        self.cfg = resolve(cfg, world_size, tokenizer_vocab=tok.get_vocab_size(),
                           labels=[r.label for r in self.train_texts], examples=len(self.train_texts))
        labels, max_len = self.cfg.model.labels, self.cfg.classify.max_len
        self.train_set = labelled_set(self.train_texts, tok, labels, max_len)
        self.eval_set = labelled_set(self.eval_texts, tok, labels, max_len)
        # the training set's most frequent label (ties: the first in label order), what a constant guess picks
        self.majority = int(torch.bincount(self.train_set.labels, minlength=len(labels)).argmax())
        return self.cfg

    def describe(self) -> str:
        c = self.cfg.classify
        return (f"{len(self.cfg.model.labels)} labels {self.cfg.model.labels}; {len(self.train_set)} training and "
                f"{len(self.eval_set)} evaluation texts of at most {c.max_len} tokens; from {self.base}")

    def loader(self, batch: BatchLayout, mesh: Mesh) -> ClassifyLoader:
        p = self.cfg.parallel
        multiple = p.tp if p.sequence_parallel else 1
        if p.pp > 1:  # a pipeline schedule sends micro-batches of one shape: all as long as the longest text
            multiple *= -(-self.train_set.ids.shape[1] // multiple)
        self._loader = ClassifyLoader(self.train_set, batch, mesh.dp_rank, self.cfg.data.seed,
                                      causal=self.cfg.model.objective == "causal", multiple=multiple)
        return self._loader

    def evaluate(self, engine, mesh: Mesh, device: torch.device) -> dict:
        """Collective: the evaluation set's scores; ``val_*`` keys go to the metrics."""
        log_probs = self._log_probs(engine, mesh, device)
        truth = self.eval_set.labels
        scores = report(self.cfg.model.labels, truth, log_probs.argmax(-1), self.majority)
        loss = float(-log_probs[torch.arange(len(truth)), truth].mean())
        return {"val_loss": loss, "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro"]["f1"],
                "report": {"cross_entropy": loss, **scores}}

    def _log_probs(self, engine, mesh: Mesh, device: torch.device) -> torch.Tensor:
        """Collective: (N, labels) class log-probabilities of the evaluation texts. Every data-parallel
        rank scores every dp-th text (the rows it lacks filled and dropped); the loss function of the
        pipeline's last chunk collects them; gathered over data ranks, sent to every stage."""
        data, size = self.eval_set, self.cfg.train.micro_batch_size
        per_rank = per_rank_rows(len(data), mesh, size)
        ids, labels = data.ids[mesh.dp_rank::mesh.dp], data.labels[mesh.dp_rank::mesh.dp]
        fill = per_rank - len(ids)
        ids = torch.cat([ids, data.ids[:1].expand(fill, -1)])
        labels = torch.cat([labels, torch.full((fill,), IGNORE, dtype=labels.dtype)])
        multiple = mesh.tp if self.cfg.parallel.sequence_parallel else 1
        causal, one = self.cfg.model.objective == "causal", torch.ones((), dtype=torch.float32)
        batches = [(trim(i, multiple), y) for i, y in zip(ids.split(size), labels.split(size))]
        batches = [(i, (targets(i, y, causal), one)) for i, y in batches]
        loss_fn = engine.module.loss_fn  # Transformer and PipelineModel both hold it
        loss_fn.collect = []
        try:
            forward_only(engine, batches, mesh, device)
            last = loss_rank(engine, mesh)
            local = torch.cat(loss_fn.collect) if mesh.pp_rank == last else torch.empty(per_rank, len(self.cfg.model.labels),
                                                                         device=device)
        finally:
            loss_fn.collect = None
        if mesh.pp > 1:
            dist.broadcast(local, src=mesh.global_rank(last, mesh.dp_rank, mesh.tp_rank), group=mesh.pp_group)
        parts = [torch.empty_like(local) for _ in range(mesh.dp)]
        dist.all_gather(parts, local.contiguous(), group=mesh.dp_group)
        out = torch.empty(len(data), local.shape[1])
        for rank, part in enumerate(parts):
            out[rank::mesh.dp] = part[:len(out[rank::mesh.dp])].cpu()
        return out

    def log_fields(self) -> dict:
        return {"epoch": self._loader.epoch}

    def finish(self, run_dir: Path, scores: dict, step: int) -> None:
        """Rank 0: RUN_DIR/eval.json and confusion.png of the final scores."""
        c = self.cfg.classify
        record = {"eval_file": c.eval_file, "train_file": c.train_file, "init_from": str(self.base), "step": step,
                  **scores["report"]}
        atomic_write_text(run_dir / "eval.json", json.dumps(record, indent=1) + "\n")
        if self.cfg.train.plot:
            plot_confusion(record, run_dir / "confusion.png",
                           f"{run_dir.name}, step {step}\naccuracy {record['accuracy']:.3f} "
                           f"(majority baseline {record['majority_baseline']['accuracy']:.3f})")

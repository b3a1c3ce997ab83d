"""``train.task=lm``: language modelling on a prepared directory (or a mix of them): next-token
prediction (``model.objective=causal``) or BERT's masked LM (``masked``: megalm.train.objective).

Rank 0 prepares ``data.dir`` first if it holds nothing yet; every rank then opens the sources,
whose tokenizer decides the vocabulary. The loader streams the global batch's lanes
(megalm.data.loader); evaluation scores a fixed set of held-out sequences (the exact mean loss, and
for masked LM the share of masked tokens predicted exactly).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.config import BatchLayout, Config, resolve
from megalm.data.dataset import open_sources
from megalm.data.loader import TrainLoader, validation_sequences
from megalm.data.prepare import ensure_prepared
from megalm.parallel.distributed import World
from megalm.parallel.mesh import Mesh
from megalm.train.evaluate import score
from megalm.train.objective import build_objective


class LanguageModeling:
    def __init__(self, cfg: Config, world: World):
        if world.is_main and not cfg.data.mix:
            ensure_prepared(cfg.data)
        dist.barrier()
        self.sources = open_sources(cfg.data, cfg.train.global_batch)
        manifest = self.sources[0].manifest
        self.tokenizer: Path = self.sources[0].location.local_file(manifest.tokenizer)
        self.vocab = manifest.vocab_size
        self.unigram_entropy_nats: float | None = manifest.unigram_entropy_nats
        self.source_names = [s.name for s in self.sources]

    def resolve(self, cfg: Config, world_size: int) -> Config:
        self.cfg = resolve(cfg, world_size, tokenizer_vocab=self.vocab)
        self.objective = build_objective(self.cfg, self.tokenizer)  # next-token or masked: inputs and labels
        return self.cfg

    def describe(self) -> str:
        return f"{self.cfg.data.seq_len} tokens per sequence"

    def loader(self, batch: BatchLayout, mesh: Mesh) -> TrainLoader:
        d = self.cfg.data
        self._loader = TrainLoader(self.sources, batch, mesh.data_rank, self.objective, num_workers=d.num_workers,
                                   on_bad_shard=d.on_bad_shard, spool_dir=d.cache_dir)
        self.val = validation_sequences(self.sources, d.eval_sequences, self._loader.spool)
        return self._loader

    def evaluate(self, engine, mesh: Mesh, device: torch.device) -> dict:
        """Collective: validation loss (and for masked LM the masked-token accuracy)."""
        masked = self.objective.masked
        val = score(engine, self.val, mesh, self.cfg.train.micro_batch_size, device, self.objective, accuracy=masked)
        return {"val_loss": val.loss, "val_ppl": math.exp(val.loss), **({"val_accuracy": val.accuracy} if masked else {})}

    def log_fields(self) -> dict:
        return {}

    def finish(self, run_dir: Path, scores: dict, step: int) -> None:
        pass  # the loss curve (loss.png) is the trainer's, for every task

"""The parallel layouts a run could use: one ``Candidate`` layout is (tp, pp, dp, micro-batch, ZeRO stage,
activation checkpointing, sequence parallelism, pipeline schedule and chunks per rank, context-parallel
ranks), and ``layouts`` lists every one megalm would accept for a model on a cluster, by the same checks
``megalm train`` makes before it starts. The schedule is 1f1b unless pinned (``parallel.pp_schedule``);
context parallelism is weighed inside a node with the tensor ranks (its all-to-all each layer wants
NVLink), across nodes only when pinned (``parallel.cp``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import Config, batch_layout, validate_model_split, validate_pipeline_batch, virtual_stages
from megalm.errors import ConfigError

CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int
    checkpointing: str
    sequence_parallel: bool
    schedule: str = "1f1b"
    chunks: int = 1  # pipeline chunks per rank
    cp: int = 1  # context-parallel ranks sharing each sequence (dp counts replicas reading different ones)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def overrides(self) -> list[str]:
        """The command-line overrides that give a run this layout."""
        cp = [f"parallel.cp={self.cp}"] if self.cp > 1 else []
        pipeline = [f"parallel.pp_schedule={self.schedule}", f"parallel.virtual_stages={self.chunks}"] \
            if self.pp > 1 else []
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", *cp, f"train.micro_batch_size={self.micro_batch}",
                f"train.zero_stage={self.zero}", f"parallel.activation_checkpointing={self.checkpointing}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}", *pipeline]

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with this layout."""
        cfg = cfg.replace("parallel", tp=self.tp, pp=self.pp, cp=self.cp, dp=self.dp,
                          sequence_parallel=self.sequence_parallel,
                          activation_checkpointing=self.checkpointing, pp_schedule=self.schedule,
                          virtual_stages=self.chunks)
        return cfg.replace("train", micro_batch_size=self.micro_batch, zero_stage=self.zero)

    def micro_batches(self, cfg: Config) -> int:
        """Micro-batches per rank per step (the gradient accumulation steps)."""
        return batch_layout(self.apply(cfg), self.dp).grad_accum


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# the keys a user may pin on the command line (megalm plan ... parallel.tp=8), by Candidate field
PINNABLE = {"parallel.tp": "tp", "parallel.pp": "pp", "train.micro_batch_size": "micro_batch",
            "train.zero_stage": "zero", "parallel.activation_checkpointing": "checkpointing",
            "parallel.sequence_parallel": "sequence_parallel", "parallel.pp_schedule": "schedule",
            "parallel.virtual_stages": "chunks", "parallel.cp": "cp"}


def pinned(cfg: Config, overrides: list[str]) -> dict[str, object]:
    """The layout fields ``overrides`` set (Candidate field -> the config's value)."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    found = {field: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
             for key, field in PINNABLE.items() if key in keys}
    if "schedule" in found or "chunks" in found:  # (virtual_stages=0: the schedule's own)
        found["chunks"] = virtual_stages(cfg.parallel)
    return found


def layouts(cfg: Config, gpus: int, gpus_per_node: int, pins: dict[str, object] | None = None
            ) -> tuple[list[Candidate], dict[str, tuple[int, str]]]:
    """Every layout of ``gpus`` GPUs that megalm accepts for ``cfg``'s model, sequence length and global
    batch, with the fields ``pins`` names as they are there; and the refused ones, by the key their
    check names: (how many, one of the messages). Tensor parallelism stays inside a node;
    micro-batches are powers of two up to the per-rank batch (any size, when pinned)."""
    found, refused, pins = [], {}, pins or {}

    def refuse(key: str, message: str) -> None:
        count, first = refused.get(key, (0, message))
        refused[key] = (count + 1, first)

    def choices(field: str, free: list) -> list:
        return [pins[field]] if field in pins else free

    for tp in choices("tp", divisors(gpus_per_node)):
        if gpus_per_node % tp or gpus % tp:
            refuse("parallel.tp", f"parallel.tp={tp}: tensor parallelism stays inside a node of {gpus_per_node} "
                                  f"GPUs and must divide the {gpus} GPUs")
            continue
        for cp in choices("cp", divisors(gpus_per_node // tp)):
            if gpus % (tp * cp):
                refuse("parallel.cp", f"parallel.cp={cp}: tp={tp} x cp={cp} does not divide the {gpus} GPUs")
                continue
            for pp in choices("pp", divisors(gpus // (tp * cp))):
                if (gpus // (tp * cp)) % pp:
                    refuse("parallel.pp", f"parallel.pp={pp}: tp={tp} x cp={cp} x pp={pp} does not divide the "
                                          f"{gpus} GPUs")
                    continue
                found += _data_parallel_layouts(cfg, tp, cp, pp, gpus // (tp * cp * pp), choices, refuse, pins)
    return found, refused


def _data_parallel_layouts(cfg: Config, tp: int, cp: int, pp: int, dp: int, choices, refuse, pins) -> list[Candidate]:
    """The layouts of one (tp, cp, pp, dp): micro-batch, ZeRO stage, checkpointing and SP."""
    if dp > cfg.train.global_batch:
        refuse("parallel.dp", f"dp={dp} ranks would get no sequence of a global batch of {cfg.train.global_batch}")
        return []
    found, per_rank = [], -(-cfg.train.global_batch // dp)
    for micro in choices("micro_batch", [2**i for i in range(per_rank.bit_length()) if 2**i <= per_rank]):
        for zero in choices("zero", list(range(4))):
            for checkpointing in choices("checkpointing", list(CHECKPOINTING)):
                for sp in choices("sequence_parallel", [False, True] if tp > 1 else [False]):
                    schedule = pins.get("schedule", "1f1b") if pp > 1 else "1f1b"
                    chunks = pins.get("chunks", 1) if pp > 1 else 1
                    layout = Candidate(tp, pp, dp, micro, zero, checkpointing, sp, schedule, chunks, cp)
                    try:
                        validate_model_split(layout.apply(cfg))
                        validate_pipeline_batch(layout.apply(cfg), dp)
                    except ConfigError as e:
                        refuse(str(e).partition(":")[0], str(e))
                        continue
                    found.append(layout)
    return found


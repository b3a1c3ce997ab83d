"""Published runs the planner is held to: Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM" (arXiv 2104.04473), Table 1: ten GPT models, 1.7B to 1T
parameters, trained on 32 to 3072 A100 80GB GPUs at 44-52% of their 312 TFLOP/s.

The runs as the paper describes them (§5, §5.1, §4.2): GPT (learned positions, GELU, tied embeddings),
vocabulary 51200, sequences of 2048, mixed precision, full activation recomputation; Selene's DGX A100
nodes: 8 GPUs on NVLink, 8 HDR InfiniBand cards of 200 Gb/s (``a100-80gb``'s link speeds); Megatron's
attention, whose fused softmax and dropout run over the scores in memory (``step_time.MEGATRON_2021``);
the interleaved pipeline schedule. What the paper does not state, taken here: micro-batch 1 (Table 1 does
not list it; the paper's other experiments mostly use 1), and 2 model chunks per GPU for the interleaved
schedule, or 3 where a stage's layers do not split in two (the fewest that interleave). As megalm layouts:
the row's tp and pp, ZeRO 1 (Megatron's data parallelism all-reduces the same volume; no sequence
parallelism).

The paper's TFLOP/s divide its eq. 3, F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) per step (the
recomputed forward included), by the step time and the GPUs: the planner's step time is put through the
same F. ``python -m megalm.plan.published`` prints the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import Config
from megalm.plan.hardware import cluster
from megalm.plan.layout import Candidate
from megalm.plan.memory import Memory, memory
from megalm.plan.report import model_config
from megalm.plan.step_time import MEGATRON_2021, StepTime, step_time

VOCAB, SEQ = 51200, 2048


@dataclass(frozen=True)
class Run:
    billions: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float  # achieved per GPU, as published

    @property
    def chunks(self) -> int:
        """Model chunks per GPU of the interleaved schedule (see the module docstring)."""
        per_stage = self.layers // self.pp
        return 1 if self.pp == 1 else 2 if per_stage % 2 == 0 else 3

    @property
    def paper_flops(self) -> float:
        """FLOPs per step by the paper's eq. 3."""
        b, s, l, h = self.batch, SEQ, self.layers, self.hidden
        return 96 * b * s * l * h * h * (1 + s / (6 * h) + VOCAB / (16 * l * h))


TABLE_1 = [Run(1.7, 24, 2304, 24, 1, 1, 32, 512, 137), Run(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
           Run(7.5, 32, 4096, 36, 4, 1, 128, 512, 142), Run(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
           Run(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), Run(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
           Run(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), Run(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
           Run(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), Run(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163)]


def config(run: Run) -> Config:
    overrides = [f"model.n_layers={run.layers}", f"model.d_model={run.hidden}", f"model.n_heads={run.heads}",
                 f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ}", "model.dropout=0.1",
                 f"data.seq_len={SEQ}", f"train.global_batch={run.batch}", "train.precision=bf16"]
    return model_config("gpt-1.3b", overrides, VOCAB)[0]


def layout(run: Run) -> Candidate:
    return Candidate(run.tp, run.pp, run.gpus // (run.tp * run.pp), 1, 1, "full", False)


def predict(run: Run, efficiency: float | None = None) -> tuple[StepTime, Memory]:
    """The planner's step time and memory for ``run`` (``efficiency``: --efficiency, else the matmul table)."""
    cfg, lay = config(run), layout(run)
    machines = cluster("a100-80gb", run.gpus, efficiency=efficiency)
    return step_time(cfg, lay, machines, MEGATRON_2021, run.chunks), memory(cfg, lay)


def predicted_tflops(run: Run, time: StepTime) -> float:
    return run.paper_flops / time.total_s / run.gpus / 1e12


def table(efficiency: float | None = None) -> list[str]:
    """Published against predicted TFLOP/s per GPU (eq. 3 FLOPs over the planner's step time), row by row."""
    lines = ["params  tp  pp  GPUs  batch  chunks  published  predicted   error  step s  memory GB",
             "  (B)                                TFLOP/s    TFLOP/s"]
    for run in TABLE_1:
        time, mem = predict(run, efficiency)
        got = predicted_tflops(run, time)
        lines.append(f"{run.billions:6.1f} {run.tp:3} {run.pp:3} {run.gpus:5} {run.batch:6} {run.chunks:7} "
                     f"{run.tflops:10.0f} {got:10.1f} {100 * (got - run.tflops) / run.tflops:+6.1f}% "
                     f"{time.total_s:7.2f} {mem.allocated_gb:10.1f}")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))

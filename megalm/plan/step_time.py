"""Time of one optimizer step of a layout: compute from FLOPs at a stated share of the GPU's peak,
the pipeline bubble, and communication volume over stated link speeds.

- Compute: ``flops_per_token`` (megalm.observe.flops: 6·N-style, the attention matmuls and the LM
  head) for every sequence a rank runs, padding included, divided over tp·pp, at
  ``peak × efficiency``; full checkpointing runs the forward twice (× 4/3), selective re-runs the
  attention core's forward.
- Pipeline bubble: 1F1B over m micro-batches takes (m + pp - 1) micro-batch slots for m of work, so
  the bubble is (pp - 1) / (m + pp - 1) of the step.
- Tensor parallelism: per block and micro-batch, two all-reduces of the (tokens × d_model) activation
  in forward and two in backward (with sequence parallelism the same volume as all-gathers and
  reduce-scatters), two more in the recomputed forward of full checkpointing, plus the vocabulary-
  parallel embedding's and the head's. Ring collectives move 2·(n-1)/n of the bytes per GPU for an
  all-reduce, (n-1)/n for an all-gather or reduce-scatter. tp stays inside a node: NVLink.
- Data parallelism: the gradients once per step (ZeRO 0 and 1: all-reduce; ZeRO 1 then all-gathers
  updated weights, the same volume as the all-reduce's second half) or every micro-batch (ZeRO 2:
  reduce-scatter; ZeRO 3 adds all-gathers of the weights in forward and again in backward), over
  NVLink when the data-parallel group fits in a node, else the network.
- Pipeline: each stage boundary sends the activation forward and its gradient back per micro-batch
  (1/tp of it per tensor rank without sequence parallelism: DeepSpeed's pipe_partitioned), on the
  critical path of every micro-batch slot.

No communication is assumed to overlap compute: megalm's tensor-parallel collectives are
synchronous, and DeepSpeed as megalm configures it reduces gradients after backward (ZeRO 0) or as
its 500M-element bucket fills (ZeRO 1/2, overlap_comm off). ZeRO-3 does overlap its prefetches by
default, so its times here are an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megalm.config import Config, batch_layout
from megalm.observe.flops import flops_per_token
from megalm.plan.hardware import Cluster
from megalm.plan.layout import Candidate
from megalm.plan.memory import element_bytes, stages


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    tp_s: float
    dp_s: float
    pp_s: float
    tokens_per_step: int
    model_flops_per_gpu: float  # FLOPs of the model's work (no recomputation, no padding), for MFU
    peak_flops: float
    inputs: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.dp_s + self.pp_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.total_s

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / self.total_s / self.peak_flops


def ring(collective: str, nbytes: float, ranks: int, gbs: float) -> float:
    """Seconds of a ring collective of ``nbytes`` per rank over ``ranks`` ranks at ``gbs`` GB/s."""
    if ranks == 1:
        return 0.0
    factor = 2 * (ranks - 1) / ranks if collective == "all-reduce" else (ranks - 1) / ranks
    return factor * nbytes / (gbs * 1e9)


def step_time(cfg: Config, layout: Candidate, cluster: Cluster) -> StepTime:
    m, seq, precision = cfg.model, cfg.data.seq_len, cfg.train.precision
    e = element_bytes(precision)
    batch = batch_layout(layout.apply(cfg), layout.dp)
    micro_batches = batch.grad_accum
    per_token = flops_per_token(m, seq)
    recompute = {"none": 0.0, "selective": 2 * 2 * seq * m.d_model * m.n_layers,  # attention core's forward
                 "full": per_token / 3}[layout.checkpointing]
    sequences = batch.micro_batch_size * micro_batches  # per data-parallel rank, padding included
    peak = cluster.gpu.peak_tflops(precision) * 1e12
    compute = (per_token + recompute) * seq * sequences / (layout.tp * layout.pp) / (peak * cluster.efficiency)
    bubble = compute * (layout.pp - 1) / micro_batches

    tokens = layout.micro_batch * seq
    activation = tokens * m.d_model * e
    tp_gbs = cluster.link_gbs(layout.tp)
    per_block = (4 + (2 if layout.checkpointing == "full" else 0)) * ring("all-reduce", activation, layout.tp, tp_gbs)
    split = stages(cfg, layout)
    largest = max(split, key=lambda s: s.params)
    blocks = max(s.blocks for s in split)
    tp = micro_batches * (blocks * per_block + 2 * ring("all-reduce", activation, layout.tp, tp_gbs))

    dp_gbs = cluster.link_gbs(layout.tp * layout.dp)
    grads = largest.params * e
    dp = {0: ring("all-reduce", grads, layout.dp, dp_gbs),
          1: ring("all-reduce", grads, layout.dp, dp_gbs),
          2: micro_batches * ring("reduce-scatter", grads, layout.dp, dp_gbs)
          + ring("all-gather", grads, layout.dp, dp_gbs),
          3: micro_batches * 3 * ring("all-gather", grads, layout.dp, dp_gbs)}[layout.zero]

    pp_gbs = cluster.link_gbs(layout.gpus)
    sent = activation / (1 if layout.sequence_parallel else layout.tp)
    pp = (micro_batches + layout.pp - 1) * 2 * sent / (pp_gbs * 1e9) if layout.pp > 1 else 0.0

    inputs = {"FLOPs per token (flops_per_token)": per_token, "recomputed FLOPs per token": recompute,
              "sequences per data-parallel rank (padding included)": sequences,
              "peak TFLOP/s": peak / 1e12, "efficiency": cluster.efficiency,
              "bubble share": (layout.pp - 1) / (micro_batches + layout.pp - 1),
              "activation per micro-batch (bytes)": activation,
              "gradient bytes per rank (largest stage)": grads,
              "tp link GB/s": tp_gbs, "dp link GB/s": dp_gbs, "pp link GB/s": pp_gbs}
    model_flops = per_token * cfg.train.global_batch * seq / layout.gpus
    return StepTime(compute, bubble, tp, dp, pp, cfg.train.global_batch * seq, model_flops, peak, inputs)

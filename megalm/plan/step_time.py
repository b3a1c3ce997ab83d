"""Time of one optimizer step of a layout: its matmuls at the share of the peak their shapes reach, the
kernels that only move memory, the pipeline's bubble and fixed cost per micro-batch, and communication
over stated links.

Per micro-batch, on the slowest pipeline stage (its blocks, and the head on the last):

- Matmuls: every block's q, k/v, attention core, output and MLP matmuls and the head, forward and both
  gradient matmuls, each at its own share of the peak (plan.matmuls: from its (m, n, k) on this tensor
  rank), or all at --efficiency when given. Full checkpointing runs the blocks' forward twice;
  selective, the attention core's.
- Memory-bound kernels, at the GPU's memory bandwidth x HBM_SHARE: per block, the norms, residual adds,
  activation and dropout (``RESIDUAL_PASSES``, ``HIDDEN_PASSES``; the residual stream is whole on every
  tensor rank unless sequence-parallel), what the attention kernel moves besides its matmuls
  (``AttentionKernel``: megalm's flash kernels nothing; Megatron-LM 2021's scores), and the loss's passes
  over the logits (``LOSS_PASSES``); again for what is recomputed.
- Tensor parallelism: two all-reduces of the (tokens x d_model) activation per block in forward and two
  in backward (with sequence parallelism the same volume as all-gathers and reduce-scatters), two more
  in full checkpointing's recomputed forward, plus the vocabulary-parallel embedding's and the head's;
  a ring all-reduce moves 2·(n-1)/n of the bytes per GPU, an all-gather or reduce-scatter (n-1)/n.
- Context parallelism (cp ranks per sequence): every per-token part above on 1/cp of the tokens, the
  attention core on 1/cp of the heads; per block, attention's all-to-alls (q, k, v in and the output
  back; in backward their gradients and the output's again, for its weight gradient; the forward's again
  under full checkpointing), each moving (cp-1)/cp of its bytes per GPU, over the cp group's link.
- Pipeline: each stage boundary sends the activation forward and its gradient back, 1/tp of it per
  tensor rank (its sequence shard with sequence parallelism; without, a slice of the hidden dim that
  the next stage all-gathers, as Megatron-LM's scatter-gather sends it), each message after its
  latency (``P2P_LATENCY_S``: the fixed cost of every micro-batch slot; kernel launches add none, as the
  host queues them ahead of the GPU: DeepSpeed's NCCL sends and receives do not block it).

1F1B over m micro-batches takes m + pp - 1 slots of the slowest stage's micro-batch time; Megatron-LM's
interleaved schedule (v model chunks per GPU, ``chunks``: megalm's parallel.virtual_stages) takes
m + (pp - 1) / v slots and sends v times the messages; the zero-bubble schedules (zb, zbv) fill all but
a third of that bubble with deferred weight-gradient passes (ZB-H1's (pp - 1)(F + B - W) with equal
thirds; torch's, measured on CPU with fixed-time passes, comes within 0.03 of it: DEVELOPERS.md).
Then data parallelism: the gradients once per step (ZeRO 0 and 1: all-reduce; ZeRO 1 then all-gathers
updated weights, the same volume as the all-reduce's second half) or every micro-batch (ZeRO 2:
reduce-scatter; ZeRO 3 adds all-gathers of the weights in forward and again in backward). Link speeds:
``hardware.Cluster.group_gbs`` (a group inside a node: NVLink; across nodes: its members' network cards
in a node).

No communication is assumed to overlap compute: megalm's tensor-parallel collectives are
synchronous, and DeepSpeed as megalm configures it reduces gradients after backward (ZeRO 0) or as
its 500M-element bucket fills (ZeRO 1/2, overlap_comm off). ZeRO-3 does overlap its prefetches by
default, so its times here are an upper bound. Not counted: the optimizer step (memory-bound, under 1%
of the published runs' steps), the embedding lookup, RoPE, the all-gather over NVLink that reassembles a
partitioned pipeline message, data loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megalm.config import Config, ModelConfig, batch_layout
from megalm.observe.flops import flops_per_token
from megalm.plan.hardware import HBM_SHARE, Cluster
from megalm.plan.layout import Candidate
from megalm.plan.matmuls import Matmul, block_matmuls, head_matmul, share
from megalm.plan.memory import element_bytes, stages

# Elements read plus written by one block's kernels other than matmuls, per element of the residual stream
# (tokens x d_model), (forward, backward): 2 norms (read x, write y; backward reads dy and x, writes dx) and
# 2 residual adds (read 2, write 1; backward sums the two branches' gradients the same way).
RESIDUAL_PASSES = (2 * 2 + 2 * 3, 2 * 3 + 2 * 3)
# The same per element of the MLP's hidden (tokens x ffn / tp): GELU reads and writes it (backward reads the
# gradient and the input, writes one); SwiGLU reads both halves and writes one (backward writes two).
HIDDEN_PASSES = {"gpt2": (2, 3), "llama": (3, 5)}
# The two dropouts (attention and MLP outputs) when model.dropout > 0, per residual element and each way: each
# reads and writes the activation (forward) or its gradient (backward), and writes or reads a 1-byte mask.
DROPOUT_PASSES, DROPOUT_MASK_BYTES = 2 * 2, 2 * 1
# The loss over each logit (fp32 log-softmax), passes in the model's precision and in fp32: read the logits,
# write the log-probabilities; backward reads them, writes their gradient (fp32) and the logits' gradient.
LOSS_PASSES, LOSS_FP32_PASSES = 2, 3
# Latency of one NCCL send/receive, the fixed cost of each of a slot's two pipeline messages: 31-34 us for
# messages up to 8 KB between two nodes (NVIDIA/nccl-tests issue #214), ~3 us over NVLink (NVIDIA/nccl #1487).
P2P_LATENCY_S = {"network": 30e-6, "nvlink": 3e-6}


@dataclass(frozen=True)
class AttentionKernel:
    """Bytes per attention score (per head, T x T per sequence) that the kernels between the attention
    core's two matmuls read and write, (forward, backward)."""

    name: str
    forward: float
    backward: float


# megalm's attention (its Triton kernel, or SDPA's flash/cuDNN ones) keeps the scores on chip.
FLASH = AttentionKernel("flash: scores stay on chip", 0, 0)
# Megatron-LM 2021 (Narayanan et al. §4.2): a fused scale-mask-softmax reads the fp16 scores and writes the
# probabilities (backward: reads them and their gradient, writes one); dropout (p 0.1) reads them, writes them
# and a 1-byte mask (backward: reads the gradient and the mask, writes one).
MEGATRON_2021 = AttentionKernel("Megatron-LM 2021: softmax and dropout over the scores in memory",
                                2 * 2 + 2 * 2 + 1, 3 * 2 + 2 * 2 + 1)


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # matmuls
    memory_s: float  # memory-bound kernels
    bubble_s: float
    tp_s: float
    dp_s: float
    pp_s: float  # stage-boundary messages, latency included
    tokens_per_step: int
    model_flops_per_gpu: float  # FLOPs of the model's work (no recomputation, no padding), for MFU
    peak_flops: float
    inputs: dict = field(default_factory=dict)
    cp_s: float = 0.0  # context parallelism's all-to-alls

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.bubble_s + self.tp_s + self.dp_s + self.pp_s + self.cp_s

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
    # (an all-gather, reduce-scatter or all-to-all sends (n - 1)/n of its bytes)
    factor = 2 * (ranks - 1) / ranks if collective == "all-reduce" else (ranks - 1) / ranks
    return factor * nbytes / (gbs * 1e9)


def matmul_time(mms: list[Matmul], cluster: Cluster, precision: str) -> float:
    e, peak = element_bytes(precision), cluster.gpu.peak_tflops(precision) * 1e12
    return sum(mm.flops / (peak * (cluster.efficiency or share(cluster.gpu, mm, precision, e))) for mm in mms)


def block_memory_bytes(m: ModelConfig, layout: Candidate, seq: int, precision: str, attention: AttentionKernel
                       ) -> float:
    """Bytes one block's memory-bound kernels read and write per micro-batch on one tensor rank, recomputation
    included."""
    e, tokens = element_bytes(precision), layout.micro_batch * seq // layout.cp
    residual = tokens * m.d_model / (layout.tp if layout.sequence_parallel else 1)
    hidden = tokens * m.ffn_dim / layout.tp
    scores = layout.micro_batch * m.n_heads // layout.tp // layout.cp * seq * seq
    dropout = (DROPOUT_PASSES * e + DROPOUT_MASK_BYTES) * residual if m.dropout > 0 else 0
    forward = e * (RESIDUAL_PASSES[0] * residual + HIDDEN_PASSES[m.style][0] * hidden) + dropout
    backward = e * (RESIDUAL_PASSES[1] * residual + HIDDEN_PASSES[m.style][1] * hidden) + dropout
    recompute = {"none": 0, "selective": attention.forward * scores, "full": forward}[layout.checkpointing]
    return forward + backward + attention.forward * scores + attention.backward * scores + recompute


def context_parallel_bytes(m: ModelConfig, layout: Candidate, seq: int, precision: str) -> float:
    """Bytes one block's attention all-to-alls send per micro-batch on one rank (before the (cp-1)/cp
    that stays): q, k, v and the output forward, their gradients and the output again backward, the
    forward's again when fully checkpointed. Key/value heads fewer than cp are repeated up to cp first."""
    if layout.cp == 1:
        return 0.0
    e, tokens = element_bytes(precision), layout.micro_batch * seq // layout.cp
    heads = m.n_heads // layout.tp
    kv = max(m.kv_heads // layout.tp if m.kv_heads % layout.tp == 0 else 1, layout.cp)
    q = tokens * heads * m.head_dim * e
    forward = 2 * q + 2 * tokens * kv * m.head_dim * e  # q and the output, k and v
    return forward * (2 if layout.checkpointing != "full" else 3) + q


def data_parallel_s(zero: int, grads: float, dp: int, gbs: float, micro_batches: int) -> float:
    """Seconds of a step's data-parallel communication of ``grads`` bytes per rank under ZeRO stage ``zero``."""
    return {0: ring("all-reduce", grads, dp, gbs),
            1: ring("all-reduce", grads, dp, gbs),
            2: micro_batches * ring("reduce-scatter", grads, dp, gbs) + ring("all-gather", grads, dp, gbs),
            3: micro_batches * 3 * ring("all-gather", grads, dp, gbs)}[zero]


def step_time(cfg: Config, layout: Candidate, cluster: Cluster, attention: AttentionKernel = FLASH,
              chunks: int | None = None) -> StepTime:
    """``chunks``: model chunks per GPU of an interleaved pipeline schedule (default: the layout's)."""
    chunks = chunks or layout.chunks
    m, seq, precision = cfg.model, cfg.data.seq_len, cfg.train.precision
    e, b, tp, pp = element_bytes(precision), layout.micro_batch, layout.tp, layout.pp
    micro_batches = batch_layout(layout.apply(cfg), layout.dp).grad_accum
    hbm = cluster.gpu.hbm_tbs * 1e12 * HBM_SHARE

    forward = block_matmuls(m, b, seq, tp, layout.cp)
    core = [mm for mm in forward if mm.name in ("attention scores", "attention mix")]
    recomputed = {"none": [], "selective": core, "full": forward}[layout.checkpointing]
    block_mm = forward + [g for mm in forward for g in mm.gradients()] + recomputed
    head = head_matmul(m, b, seq, tp, layout.cp)
    block = {"matmuls": matmul_time(block_mm, cluster, precision),
             "memory": block_memory_bytes(m, layout, seq, precision, attention) / hbm}
    last = {"matmuls": matmul_time([head, *head.gradients()], cluster, precision),
            "memory": (LOSS_PASSES * e + LOSS_FP32_PASSES * 4) * head.m * head.n / hbm}

    activation = b * seq // layout.cp * m.d_model * e  # this rank's part of the sequences
    tp_gbs = cluster.group_gbs(1, tp)
    cp_gbs = cluster.group_gbs(tp, layout.cp)  # (the cp ranks of a sequence follow its tensor ranks)
    block["cp"] = ring("all-to-all", context_parallel_bytes(m, layout, seq, precision), layout.cp, cp_gbs)
    block["tp"] = (4 + (2 if layout.checkpointing == "full" else 0)) * ring("all-reduce", activation, tp, tp_gbs)
    ends = ring("all-reduce", activation, tp, tp_gbs)  # the embedding's on the first stage, the head's on the last

    pipeline_link = "network" if pp > 1 and layout.gpus > cluster.gpus_per_node else "nvlink"
    pp_gbs = cluster.inter_node_gbs if pipeline_link == "network" else cluster.intra_node_gbs
    sent = activation / tp  # a tensor rank's share: its sequence shard with SP, else a hidden-dim slice
    messages = 2 * chunks if pp > 1 else 0
    p2p = messages * (P2P_LATENCY_S[pipeline_link] + sent / (pp_gbs * 1e9))

    def slot(stage) -> dict[str, float]:
        parts = {k: stage.blocks * block[k] for k in ("matmuls", "memory", "tp", "cp")}
        parts["matmuls"] += last["matmuls"] if stage.last else 0
        parts["memory"] += last["memory"] if stage.last else 0
        parts["tp"] += ends * (stage.first + stage.last)
        parts["pp"] = p2p
        return parts

    split = stages(cfg, layout)
    slowest_stage = max(split, key=lambda stage: sum(slot(stage).values()))
    slowest = slot(slowest_stage)
    # zero bubble fills the bubble with the deferred weight-gradient passes: ZB-H1's (pp - 1)(F + B - W),
    # with a slot's forward, input-gradient and weight-gradient thirds (Qi et al. 2024)
    bubble_slots = (pp - 1) / chunks / (3 if layout.schedule in ("zb", "zbv") else 1)

    grads = max(s.params for s in split) * e
    # the data-parallel groups of all stages reduce at once: the slowest sets the pace (the context-parallel
    # ranks of a sequence reduce their gradients with the replicas')
    reducing = layout.dp * layout.cp
    dp_gbs = min(cluster.group_gbs(tp, reducing, stage * reducing * tp) for stage in range(pp))
    dp = data_parallel_s(layout.zero, grads, reducing, dp_gbs, micro_batches)

    per_token = flops_per_token(m, seq)
    peak = cluster.gpu.peak_tflops(precision) * 1e12
    inputs = {"matmuls (forward)": [(mm.name, mm.m, mm.n, mm.k, mm.count) for mm in [*forward, head]],
              "matmul shares": {mm.name: cluster.efficiency or share(cluster.gpu, mm, precision, e)
                                for mm in [*forward, head]},
              "efficiency": cluster.efficiency, "peak TFLOP/s": peak / 1e12,
              "attention kernel": attention.name, "memory-bound bytes per block": block["memory"] * hbm,
              "memory GB/s": hbm / 1e9, "micro-batches per step": micro_batches, "model chunks per GPU": chunks,
              "blocks on the slowest stage": slowest_stage.blocks,
              "bubble share": bubble_slots / (micro_batches + bubble_slots),
              "pipeline messages per slot": messages, "p2p latency (s)": P2P_LATENCY_S[pipeline_link],
              "activation per micro-batch (bytes)": activation, "gradient bytes per rank (largest stage)": grads,
              "tp link GB/s": tp_gbs, "dp link GB/s": dp_gbs, "pp link GB/s": pp_gbs, "cp link GB/s": cp_gbs,
              "cp all-to-all bytes per block": context_parallel_bytes(m, layout, seq, precision)}
    model_flops = per_token * cfg.train.global_batch * seq / layout.gpus
    return StepTime(micro_batches * slowest["matmuls"], micro_batches * slowest["memory"],
                    bubble_slots * sum(slowest.values()), micro_batches * slowest["tp"], dp,
                    micro_batches * slowest["pp"], cfg.train.global_batch * seq, model_flops, peak, inputs,
                    micro_batches * slowest["cp"])

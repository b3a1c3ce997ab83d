"""Per-GPU memory of a training layout, from the config alone: what megalm's layers save for backward
and what the DeepSpeed optimizer path our engine takes keeps, at the moment a step peaks.

Counted, for the most loaded pipeline stage (bytes; GB = 1e9 bytes, as ``mem_peak_gb``):

- weights, gradients, fp32 master weights and AdamW's two fp32 moments, as the DeepSpeed 0.19 path
  for the precision and ZeRO stage keeps them (``model_state``; torch's AdamW, ``torch_adam: true``),
  and the fp32 gradients the optimizer steps on: with ZeRO 3 in bf16, 2 + 2 + 4 + 8 = 16 bytes per
  parameter / dp through forward and backward (what the ZeRO paper counts) and 20 / dp at the step,
  where DeepSpeed builds an fp32 partition of the gradients (``ModelState.at_step``);
- DeepSpeed's gradient reduction buffers: the ZeRO reduce bucket (500M elements, allocated whole on a
  GPU) and ZeRO-3's gathered parameters (it keeps a parameter gathered when it is used again within
  1e9 elements, so backward finds the last ~5e8 elements of each stage still whole);
- activations saved for backward, from megalm's layers (``saved_per_layer``), times the micro-batches
  in flight (1F1B: pp - stage on stage ``stage``, so pp on the first), and the pipeline messages a
  stage holds (train/pipeline.py's ``LeanStage``: two with 1F1B; a step's sends with the others);
- the transients of the three moments a step can peak at: the start of backward (all activations,
  plus the loss's vocabulary-sized fp32 buffers or one block's recomputation with full
  checkpointing), the end of backward (the flattened gradients DeepSpeed all-reduces) and the
  optimizer step (fp32 gradient copies, the temporaries of torch's multi-tensor AdamW).

Not counted: the CUDA context, NCCL buffers and cuBLAS workspaces (a fixed
``hardware.CUDA_OVERHEAD_GB`` per GPU, and ``hardware.ALLOCATABLE_SHARE`` for fragmentation, decide
what fits); the data loader, evaluation and checkpoint staging (host memory); torch.compile's
workspaces; ZeRO-3's prefetch bucket and the small parameters it keeps whole (norms, biases); and
items under 1% (token ids, RoPE tables, per-token scalars of the loss).

On a CPU (``device="cpu"``, used to check the model against measured runs) there is no CUDA
overhead; only the touched pages of DeepSpeed's reduce bucket are resident; torch's AdamW loops over
tensors (no multi-tensor temporaries); torch's RMSNorm saves its normalized input too, and SDPA returns
RoPE attention in (batch, head, token) order, so its output is copied before the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megalm.config import Config, ModelConfig
from megalm.model.pipeline import chunk_ranks, layer_parameters, partition
from megalm.plan.layout import Candidate

GB = 1e9
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); also the gradient flattening chunk
ZERO3_GATHERED = 500_000_000  # ZeRO-3 keeps params reused within max_reuse_distance (1e9) elements: ~half
SUB_GROUP = 1_000_000_000  # ZeRO-3's sub_group_size (elements): the optimizer steps one sub-group at a time


@dataclass(frozen=True)
class Stage:
    """One pipeline stage on one tensor-parallel rank: its parameters and what it runs."""

    index: int
    params: int
    blocks: int
    first: bool
    last: bool


@dataclass(frozen=True)
class ModelState:
    """Bytes of one rank's model state under one DeepSpeed optimizer path."""

    path: str
    weights: float
    gradients: float  # at the end of a step's last backward
    accumulated: float  # what the earlier micro-batches' gradients hold through the later ones
    master: float  # fp32 master weights
    moments: float  # AdamW's exp_avg and exp_avg_sq, fp32
    buffers: float  # reduce bucket, accumulation buffer, ZeRO-3's gathered parameters
    reduce: float  # transient at the end of backward
    fp32_gradients: float  # the fp32 gradients the optimizer steps on (bf16 paths' copies, ZeRO-3's partition)
    step: float  # the optimizer step's other transients (AdamW's temporaries, a flattening copy)
    gradients_persist: bool = False  # allocated once and kept (ZeRO-3's partition), not per step

    @property
    def at_step(self) -> float:
        """Model state at the optimizer step: weights, gradients (fp32 ones too), master weights, moments."""
        return self.weights + self.gradients + self.fp32_gradients + self.master + self.moments


@dataclass(frozen=True)
class Memory:
    """The estimated peak of one GPU (the most loaded stage), in bytes, and the inputs of its formulas."""

    stage: Stage
    state: ModelState
    activations: float  # saved for backward, all micro-batches in flight
    working: float  # backward's own transient: loss buffers or one block's recomputation
    peak_at: str  # which moment of the step is the peak
    allocated: float  # what torch.cuda.max_memory_allocated would report
    inputs: dict = field(default_factory=dict)

    @property
    def allocated_gb(self) -> float:
        return self.allocated / GB


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ----------------------------------------------------------------------------- parameters


def stages(cfg: Config, layout: Candidate) -> list[Stage]:
    """What each pipeline rank holds (one stage without pipelining), split as megalm's pipeline
    splits the layers into pp x chunks chunks (parallel.pp_partition: balancing parameters, or equal
    layer counts) and places them by the schedule (model/pipeline.py ``chunk_ranks``)."""
    m = cfg.model
    counts = layer_parameters(m, layout.tp, pipeline=layout.pp > 1)
    if layout.pp == 1:
        return [Stage(0, sum(counts), m.n_layers, True, True)]
    bounds = partition(tuple(counts), layout.pp * layout.chunks, cfg.parallel.pp_partition)
    owners = chunk_ranks(layout.schedule, layout.pp, layout.chunks)
    last_block = m.n_layers  # layer ids: 0 embed, 1..n_layers blocks, then norm and head
    out = []
    for rank in range(layout.pp):
        mine = [k for k, owner in enumerate(owners) if owner == rank]
        params = sum(sum(counts[bounds[k]:bounds[k + 1]]) for k in mine)
        blocks = sum(len(range(max(bounds[k], 1), min(bounds[k + 1], last_block + 1))) for k in mine)
        out.append(Stage(rank, params, blocks, 0 in mine, len(owners) - 1 in mine))
    return out


# ------------------------------------------------------------------------- model state


def model_state(precision: str, zero: int, pipeline: bool, params: int, dp: int, micro_batches: int,
                device: str) -> ModelState:
    """Weights, gradients, optimizer states and DeepSpeed's buffers of ``params`` parameters on one rank.

    Which optimizer wrapper DeepSpeed 0.19 builds (engine._do_optimizer_sanity_check, with megalm's
    config: no data_types.grad_accum_dtype, so gradients accumulate in the model's precision):
    fp32 and ZeRO 0 is torch's AdamW as it is; bf16 and ZeRO 0 is FP16_UnfusedOptimizer (an fp32
    copy of every weight), or BF16_Optimizer under the pipeline engine (fp32 master weights and states
    sharded over dp, a bf16 accumulation buffer); ZeRO 1/2 is DeepSpeedZeroOptimizer (fp32 master
    partition cloned even in fp32); ZeRO 3 is DeepSpeedZeroOptimizer_Stage3.
    """
    e, p, shard = element_bytes(precision), params, params / dp
    gpu = device != "cpu"
    bucket = e * (BUCKET if gpu else min(BUCKET, p))  # a CPU only makes resident the pages it writes
    flat = e * min(p, BUCKET)  # DeepSpeed's buffered all-reduce flattens the gradients (dp = 1 too)
    foreach = 4 if gpu else 0  # torch's multi-tensor AdamW: one fp32 temporary per element (CPU: per tensor)
    fp32_grads = 4 if precision == "bf16" else 0  # copies of the gradients in fp32 for the step
    if zero == 0 and precision == "fp32":
        return ModelState("torch AdamW, fp32", 4 * p, 4 * p, 4 * p, 0, 8 * p, 0, flat, 0, foreach * p)
    if zero == 0 and not pipeline:
        return ModelState("FP16_UnfusedOptimizer, bf16", 2 * p, 2 * p, 2 * p, 4 * p, 8 * p, 0, flat, 4 * p,
                          foreach * p)
    if zero == 0:
        return ModelState("BF16_Optimizer, bf16 (states sharded over dp)", 2 * p, 2 * p, 2 * p, 4 * shard,
                          8 * shard, 2 * p, flat, 4 * shard, foreach * shard)
    if zero in (1, 2):
        # Stage 1 accumulates whole gradients until the last micro-batch, whose backward moves them
        # into the reduce bucket; stage 2 reduces every micro-batch into its gradient partition. The
        # bucket is allocated at the first gradient of each backward and released by the step: whole
        # on a GPU; on a CPU its pages become resident as the gradients fill it, while activations go.
        accumulated = e * p if zero == 1 else e * shard
        resident_bucket, filled_bucket = (bucket, 0) if gpu else (0, bucket)
        return ModelState(f"DeepSpeedZeroOptimizer stage {zero}, {precision}", e * p,
                          (0 if zero == 1 else e * shard) + filled_bucket, accumulated, 4 * shard, 8 * shard,
                          resident_bucket, e * shard if zero == 1 else 0, fp32_grads * shard, foreach * shard)
    # In fp32 the parameter partition is the master copy. The gradient partition, in the model's precision,
    # is allocated once and kept. The step builds the fp32 gradient partition it steps on (a flattened copy
    # first), sub-group by sub-group, and frees each after its sub-group's step (stage3.py:
    # _prepare_fp32_grad_for_sub_group, _release_sub_group): with the 16 bytes the ZeRO paper counts per
    # parameter (bf16 weights, gradients; fp32 master, moments), 20 bytes / dp at the step, 16 before it.
    # The reduce bucket is allocated once (a CPU keeps the pages it wrote) and the gathered weights stay
    # between passes.
    master = 4 * shard if precision == "bf16" else 0
    sub_group = min(shard, SUB_GROUP)
    flattened = e * sub_group if precision == "bf16" else 0  # in fp32 the flattened copy is the fp32 one
    return ModelState(f"DeepSpeedZeroOptimizer_Stage3, {precision}", e * shard, e * shard, e * shard, master,
                      8 * shard, bucket + e * min(p, ZERO3_GATHERED), 0, 4 * sub_group,
                      max(flattened, foreach * sub_group), gradients_persist=True)


# --------------------------------------------------------------------------- activations


def saved_per_layer(m: ModelConfig, tokens: int, tp: int, sp: bool, checkpointing: str, precision: str,
                    device: str, cp: int = 1) -> dict[str, float]:
    """Bytes one Transformer block saves for backward on one tensor rank, for a micro-batch of
    ``tokens`` tokens, by what saves them (megalm.model.layers; the attention core is flash-style
    SDPA or Triton: q, k, v, the output and a log-sum-exp, never the T x T scores).

    With sequence parallelism everything outside the attention and MLP regions holds tokens / tp
    positions, the q/k/v and MLP projections' input included (they gather it again in backward).
    With context parallelism a rank holds tokens / cp positions of everything, and attention the
    whole sequence of 1/cp of the heads: the same bytes, but for key/value heads fewer than cp, each
    rank then holding one of them whole (megalm.parallel.context_parallel).
    Full checkpointing keeps only the block's input; selective recomputes the attention core (with
    flash-style attention that frees only the log-sum-exp)."""
    e, n, h, t = element_bytes(precision), tokens / cp, m.d_model, tp
    residual = n * h * e / (t if sp else 1)
    if checkpointing == "full":
        return {"block input (the checkpoint)": residual}
    llama, cpu = m.style == "llama", device == "cpu"
    local_kv = m.kv_heads // t if m.kv_heads % t == 0 else 1
    kv = max(local_kv, cp) / cp * m.head_dim * tokens * e  # one of k, v on this rank
    parts = {
        "residual inputs of the 2 norms": 2 * residual,
        "norm statistics (fp32)": 2 * n / (t if sp else 1) * 4 * (1 if llama else 2),
        "norm outputs, input of q/k/v and MLP up": 2 * residual,
        "q, k, v": n * h / t * e + 2 * kv,
        "attention output": n * h / t * e,
        "MLP hidden (GELU in, out)" if not llama else "MLP hidden (gate|up, product)":
            (3 if llama else 2) * n * m.ffn_dim / t * e,
    }
    if checkpointing == "none":
        parts["softmax log-sum-exp (fp32)"] = n * m.n_heads / t * 4
    if llama and cpu:
        parts["normalized inputs (torch's RMSNorm on CPU)"] = 2 * residual
    if m.dropout > 0:
        parts["dropout masks (bool)"] = 2 * n * h / (t if sp else 1)
    return parts


def saved_by_head(m: ModelConfig, tokens: int, tp: int, sp: bool, precision: str, device: str) -> dict[str, float]:
    """Bytes the last stage saves beyond its blocks: the final norm, the head's input and the loss's
    fp32 log-probabilities (softmax with tp > 1) over this rank's slice of the vocabulary, for
    ``tokens`` positions on this rank."""
    e, n, h, t = element_bytes(precision), tokens, m.d_model, tp
    residual = n * h * e / (t if sp else 1)
    parts = {"final norm input": residual, "final norm output, head input": residual,
             "log-probabilities (fp32)": n * m.vocab_size / t * 4}
    if m.style == "llama" and device == "cpu":
        parts["normalized input (torch's RMSNorm on CPU)"] = residual
    return parts


def loss_backward_bytes(m: ModelConfig, tokens: int, tp: int) -> float:
    """Backward of the loss: the gradients of the log-probabilities and of the logits, fp32, while the
    saved log-probabilities still live."""
    return 2 * tokens * m.vocab_size / tp * 4


# ---------------------------------------------------------------------------------- peak


def memory(cfg: Config, layout: Candidate, device: str = "cuda") -> Memory:
    """The peak of the most loaded stage of ``layout`` for ``cfg`` (model vocabulary and length
    resolved): per stage, resident state plus the largest of the three moments' needs."""
    return max((stage_memory(cfg, layout, stage, device) for stage in stages(cfg, layout)),
               key=lambda mem: mem.allocated)


def stage_memory(cfg: Config, layout: Candidate, stage: Stage, device: str) -> Memory:
    m, precision = cfg.model, cfg.train.precision
    micro_batches = layout.micro_batches(cfg)
    tokens = layout.micro_batch * cfg.data.seq_len  # of whole sequences; a context-parallel rank holds 1/cp
    local = tokens // layout.cp  # (cp divides the sequence)
    # the context-parallel ranks of a sequence hold the same weights: ZeRO shards over them as over replicas
    state = model_state(precision, layout.zero, layout.pp > 1, stage.params, layout.dp * layout.cp, micro_batches,
                        device)
    per_layer = saved_per_layer(m, tokens, layout.tp, layout.sequence_parallel, layout.checkpointing, precision,
                                device, layout.cp)
    head = saved_by_head(m, local, layout.tp, layout.sequence_parallel, precision, device) if stage.last else {}
    # Pipeline messages (a tensor rank's 1/tp of an activation: its sequence shard with SP, else a slice
    # of the hidden dim that the next stage gathers). megalm's stage frees an output once its send is
    # done and holds a receive buffer from its receive to its backward (the input its first block
    # saves, counted with the blocks): 1F1B then holds two messages more (a send not yet waited for,
    # the next micro-batch's receive posted early); torch's other schedules wait for their sends at the
    # end of the step, so every message this rank's chunks send in a step is held until then.
    message = local * m.d_model * element_bytes(precision) / layout.tp
    sending_chunks = layout.chunks - (1 if stage.last else 0)
    pipe_buffers = 0 if layout.pp == 1 else 2 * message if layout.schedule == "1f1b" else \
        micro_batches * sending_chunks * message
    per_micro_batch = stage.blocks * sum(per_layer.values()) + sum(head.values())
    # 1F1B: a step's first backward finds up to pp - stage micro-batches in flight and no gradients yet
    # (unless they persist); every later one finds the earlier micro-batches' gradients, and one fewer
    # in flight when the step has no more micro-batches than stages. Interleaved 1F1B runs
    # (v - 1) pp + 2 (pp - stage - 1) + 1 chunk forwards before its first backward, each 1/v of the
    # rank's layers (Megatron-LM's warm-up, which torch's schedule follows): about 1.5 pp micro-batches
    # on the first rank at v = 2. The zero-bubble schedules keep 1F1B's count (their point: ZB-H1's
    # memory is 1F1B's; the deferred weight passes' inputs are not counted).
    ahead = layout.pp - stage.index
    if layout.schedule == "interleaved":
        ahead = ((layout.chunks - 1) * layout.pp + 2 * (layout.pp - stage.index - 1) + 1) / layout.chunks
    in_flight = min(ahead, micro_batches)
    activations = in_flight * per_micro_batch + pipe_buffers
    first = activations + (state.accumulated if state.gradients_persist else 0)
    later = min(ahead, micro_batches - 1) * per_micro_batch + pipe_buffers + state.accumulated \
        if micro_batches > 1 else 0
    recompute = sum(saved_per_layer(m, tokens, layout.tp, layout.sequence_parallel, "none", precision,
                                    device, layout.cp).values()) if layout.checkpointing == "full" else 0
    working = max(loss_backward_bytes(m, local, layout.tp) if stage.last else 0, recompute)
    resident = state.weights + state.master + state.moments + state.buffers
    needs = {"start of backward": max(first, later) + working,  # what each moment of a step adds to the resident
             "end of backward": state.gradients + state.reduce,
             "optimizer step": state.gradients + state.fp32_gradients + state.step}
    peak_at = max(needs, key=needs.get)
    inputs = {"tokens per micro-batch": local, "micro-batches per step": micro_batches,
              "micro-batches in flight": in_flight, "blocks on this stage": stage.blocks,
              "pipeline messages held (bytes)": pipe_buffers,
              "parameters on this GPU": stage.params, "saved per block per micro-batch (bytes)": per_layer,
              "saved by the final norm and loss (bytes)": head}
    return Memory(stage, state, activations, working, peak_at, resident + needs[peak_at], inputs)

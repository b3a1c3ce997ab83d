"""``megalm plan``: every layout of a model on a cluster, estimated, ranked and explained.

    megalm plan gpt2-125m --gpu h100-sxm --gpus 1
    megalm plan configs/quickstart.yaml model=gpt-1.3b train.precision=bf16 --gpus 64 --seq-len 2048

Each layout megalm would accept (``layout.layouts``; with the fields given on the command line, such
as ``parallel.tp=8``, as given) gets a per-GPU memory estimate
(``memory.memory``) and a step time (``step_time.step_time``: each matmul at the share of the peak its
shape reaches, ``matmuls``, unless --efficiency gives one share for all); those that fit the GPU are
ranked by tokens/s. The report shows the top ones, then the inputs of every formula for the best, and the
overrides that select it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megalm.config import Config, load_config, resolve, run_file, shipped
from megalm.errors import ConfigError
from megalm.model.transformer import parameter_count
from megalm.plan.hardware import CUDA_OVERHEAD_GB, Cluster, cluster
from megalm.plan.layout import PINNABLE, Candidate, layouts, pinned
from megalm.plan.matmuls import SUSTAINED_SHARE
from megalm.plan.memory import GB, Memory, memory
from megalm.plan.step_time import StepTime, step_time


@dataclass(frozen=True)
class Estimate:
    layout: Candidate
    memory: Memory
    time: StepTime
    fits: bool


@dataclass(frozen=True)
class Plan:
    cfg: Config
    cluster: Cluster
    vocab_note: str
    ranked: list[Estimate]  # the layouts that fit, fastest first
    too_big: list[Estimate]  # the others, smallest first
    refused: dict[str, tuple[int, str]]
    pins: dict[str, object]  # the layout fields fixed on the command line


def model_config(config: str, overrides: list[str], vocab: int) -> tuple[Config, str, dict[str, object]]:
    """The run config (a run file or shipped run; or a model preset name, on default run settings), its
    vocabulary and length resolved as training resolves them; where the vocabulary came from; and
    the layout fields ``overrides`` pin (the config holds a plain layout: each one weighed is checked)."""
    try:
        run_file(config)
    except ConfigError:
        if config not in shipped("model"):
            raise
        config, overrides = None, [f"model={config}", *overrides]
    cfg = load_config(config, overrides, check=False)
    pins = pinned(cfg, overrides)
    cfg = cfg.replace("parallel", tp=1, pp=1, sequence_parallel=False, activation_checkpointing="none")
    cfg = cfg.replace("train", zero_stage=0)
    if cfg.model.vocab_size:
        return resolve(cfg, None, tokenizer_vocab=cfg.model.vocab_size), "model.vocab_size", pins
    return resolve(cfg, None, tokenizer_vocab=vocab), f"--vocab {vocab} (the config leaves it to the tokenizer)", pins


def make_plan(cfg: Config, machines: Cluster, vocab_note: str = "model.vocab_size",
              pins: dict[str, object] | None = None) -> Plan:
    found, refused = layouts(cfg, machines.gpus, machines.gpus_per_node, pins)
    estimates = []
    for layout in found:
        mem = memory(cfg, layout)
        estimates.append(Estimate(layout, mem, step_time(cfg, layout, machines),
                                  mem.allocated_gb <= machines.usable_gb))
    # Between equal estimates: fewer, larger micro-batches (better matmul shapes and fewer launches than
    # the FLOP count sees), then less memory.
    ranked = sorted((e for e in estimates if e.fits),
                    key=lambda e: (-round(e.time.tokens_per_s), -e.layout.micro_batch, e.memory.allocated))
    too_big = sorted((e for e in estimates if not e.fits), key=lambda e: e.memory.allocated)
    return Plan(cfg, machines, vocab_note, ranked, too_big, refused, pins or {})


# ---------------------------------------------------------------------------------- report


def report(plan: Plan, top: int) -> str:
    lines = _header(plan)
    if plan.ranked:
        lines += ["", *_table(plan.ranked[:top])]
        lines += ["", *_explain(plan.ranked[0], plan)]
    elif plan.too_big:
        closest = plan.too_big[0]
        lines += ["", f"nothing fits in {plan.cluster.usable_gb:.1f} GB: the smallest "
                      f"{'pinned ' if plan.pins else ''}layout needs {closest.memory.allocated_gb:.1f} GB",
                  *_table([closest]), "", *_explain(closest, plan)]
    else:
        lines += ["", f"no layout of these GPUs{' with the pinned fields' if plan.pins else ''} passes megalm's "
                      f"checks (see the refusals above)"]
    return "\n".join(lines)


def _header(plan: Plan) -> list[str]:
    cfg, c = plan.cfg, plan.cluster
    m, t = cfg.model, cfg.train
    seq, batch = cfg.data.seq_len, t.global_batch
    matmuls = (f"every matmul at --efficiency {c.efficiency:g} of it (replaces the table)" if c.efficiency else
               f"each matmul at its shape's share (plan/matmuls.py: {c.gpu.mamf_source}; x {SUSTAINED_SHARE:g} "
               f"sustained; roofline at {c.gpu.hbm_tbs:g} TB/s)")
    lines = [
        f"model: {m.name} ({m.style}, {parameter_count(m) / 1e9:.3g}B parameters, {m.n_layers} layers x {m.d_model}, "
        f"{m.n_heads} heads ({m.kv_heads} kv), ffn {m.ffn_dim}, vocab {m.vocab_size} from {plan.vocab_note}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings)",
        f"run: seq {seq}, global batch {batch} sequences ({batch * seq:,} tokens), {t.precision}",
        f"cluster: {c.gpus} x {c.gpu.name} ({c.gpu.memory_gb:g} GB, {c.gpus_per_node} per node), dense peak "
        f"{c.gpu.peak_tflops(t.precision):g} TFLOP/s {t.precision}, {matmuls}; links per GPU, achieved: "
        f"{c.intra_node_gbs:g} GB/s in a node, {c.inter_node_gbs:g} GB/s between nodes",
        f"fits: allocated peak <= {c.usable_gb:.1f} GB = ({c.gpu.memory_gb:g} GB - {CUDA_OVERHEAD_GB:g} GB CUDA "
        f"context/NCCL/workspaces) x allocatable share",
        f"layouts: {len(plan.ranked) + len(plan.too_big)} accepted by megalm's checks, {len(plan.ranked)} fit",
    ]
    if plan.pins:
        lines.insert(-1, "pinned on the command line: " + ", ".join(
            f"{key}={plan.pins[field]}" for key, field in PINNABLE.items() if field in plan.pins))
    for key, (count, example) in sorted(plan.refused.items()):
        lines.append(f"  refused {count} ({key}), e.g.: {example}")
    return lines


COLUMNS = "rank  tp  cp  pp   dp  micro  zero  ckpt       sp   memory GB   step s    tokens/s    MFU"


def _table(estimates: list[Estimate]) -> list[str]:
    lines = [COLUMNS]
    for i, e in enumerate(estimates, 1):
        lay = e.layout
        lines.append(f"{i:>4} {lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>6} {lay.zero:>5}  "
                     f"{lay.checkpointing:<9} {'on' if lay.sequence_parallel else 'off':<4} "
                     f"{e.memory.allocated_gb:>9.2f} {e.time.total_s:>8.3f} {e.time.tokens_per_s:>11,.0f} "
                     f"{100 * e.time.mfu:>5.1f}%")
    return lines


def _explain(e: Estimate, plan: Plan) -> list[str]:
    """The inputs of every formula for one layout, and how to run it."""
    lay, mem, time, state = e.layout, e.memory, e.time, e.memory.state
    p, dp = mem.stage.params, lay.dp * lay.cp  # (ZeRO shards over the context-parallel ranks too)
    cp = f" cp={lay.cp}" if lay.cp > 1 else ""
    lines = [f"layout #1: tp={lay.tp}{cp} pp={lay.pp} dp={lay.dp} micro-batch={lay.micro_batch} ZeRO {lay.zero} "
             f"checkpointing={lay.checkpointing} sequence-parallel={'on' if lay.sequence_parallel else 'off'}"
             if e.fits else "closest layout:",
             f"memory per GPU: pipeline stage {mem.stage.index} of {lay.pp} (the most loaded), "
             f"{p:,} parameters on each GPU; optimizer path: {state.path}; peak at the {mem.peak_at}",
             f"  weights           {_gb(state.weights)}",
             f"  gradients         {_gb(state.gradients)}   (at the end of backward; {state.accumulated / GB:.2f} GB "
             f"held through a step's later micro-batches)",
             f"  fp32 master       {_gb(state.master)}",
             f"  AdamW moments     {_gb(state.moments)}   (8 bytes x {p:,}"
             f"{f' / dp {dp}' if state.moments < 8 * p else ''})",
             f"  DeepSpeed buffers {_gb(state.buffers)}   (reduce bucket, accumulation buffer, ZeRO-3's gathered "
             f"weights)",
             f"  activations       {_gb(mem.activations)}   ({mem.inputs['micro-batches in flight']:g} micro-batch(es) "
             f"in flight x {mem.stage.blocks} blocks, {mem.inputs['tokens per micro-batch']:,} tokens each"
             f"{f' (1/{lay.cp} of each sequence)' if lay.cp > 1 else ''}, and "
             f"{mem.inputs['pipeline messages held (bytes)'] / GB:.2f} GB of pipeline messages)",
             f"  backward working  {_gb(mem.working)}   (loss gradients over the vocabulary, or a recomputed block)",
             f"  end of backward   {_gb(state.reduce)}   (flattened gradients for the data-parallel reduction)",
             f"  optimizer step    {_gb(state.fp32_gradients + state.step)}   (fp32 gradients "
             f"{state.fp32_gradients / GB:.2f} GB, multi-tensor AdamW temporaries, flattening copies)",
             f"  = allocated peak  {_gb(mem.allocated)}   (+ {CUDA_OVERHEAD_GB:g} GB CUDA context/NCCL not in it)"]
    if lay.zero == 3:
        lines.append(f"  ZeRO-3 model state at the optimizer step: {state.at_step / p:.3g} bytes per parameter = "
                     f"{state.at_step * dp / p:.3g} / dp {dp}: weights, gradients, fp32 master and moments (the ZeRO "
                     f"paper's 16 in bf16) and the fp32 gradient partition DeepSpeed builds for the step (4 more)")
    lines.append("  saved per block and micro-batch:")
    for name, nbytes in mem.inputs["saved per block per micro-batch (bytes)"].items():
        lines.append(f"    {name:<58} {nbytes / 1e6:10.1f} MB")
    for name, nbytes in mem.inputs["saved by the final norm and loss (bytes)"].items():
        lines.append(f"    last stage: {name:<46} {nbytes / 1e6:10.1f} MB")
    ti = time.inputs
    how = (f"every matmul at --efficiency {ti['efficiency']:g}" if ti["efficiency"] else
           "shares of the peak from each matmul's shape (plan/matmuls.py)")
    lines += [
        f"step time: {time.total_s:.4f} s -> {time.tokens_per_s:,.0f} tokens/s, MFU {100 * time.mfu:.1f}%",
        f"  matmuls  {time.compute_s:8.4f} s   ({ti['micro-batches per step']} micro-batches x "
        f"{ti['blocks on the slowest stage']} blocks (+ head) on the slowest stage, forward, recomputed forward "
        f"({lay.checkpointing}) and the two gradient matmuls of each, at {ti['peak TFLOP/s']:g} TFLOP/s x {how}):"]
    shares = ti["matmul shares"]
    for name, mm, nn, kk, count in ti["matmuls (forward)"]:
        lines.append(f"    {name:<18} {mm:>7} x {nn:>6} x {kk:>6}{f' x {count}' if count > 1 else '':<8} "
                     f"{shares[name]:.2f}")
    lines += [
        f"  memory   {time.memory_s:8.4f} s   (norms, residual adds, activation, dropout: "
        f"{ti['memory-bound bytes per block'] / 1e6:,.1f} MB per block and micro-batch, and the loss, at "
        f"{ti['memory GB/s']:,.0f} GB/s; attention: {ti['attention kernel']})",
        f"  bubble   {time.bubble_s:8.4f} s = {100 * ti['bubble share']:.1f}% of the pipeline's time "
        f"(pp - 1 = {lay.pp - 1} slots of the slowest stage's micro-batch / {ti['model chunks per GPU']} model "
        f"chunk(s) per GPU, against {ti['micro-batches per step']} of work)",
        f"  tp comm  {time.tp_s:8.4f} s   (activation {ti['activation per micro-batch (bytes)'] / 1e6:,.1f} MB "
        f"per collective at {ti['tp link GB/s']:g} GB/s)",
        f"  cp comm  {time.cp_s:8.4f} s   (attention's all-to-alls: {ti['cp all-to-all bytes per block'] / 1e6:,.1f} "
        f"MB per block and micro-batch over cp={lay.cp} at {ti['cp link GB/s']:g} GB/s)",
        f"  dp comm  {time.dp_s:8.4f} s   (gradients {ti['gradient bytes per rank (largest stage)'] / GB:.2f} GB per "
        f"rank at {ti['dp link GB/s']:g} GB/s, ZeRO {lay.zero})",
        f"  pp comm  {time.pp_s:8.4f} s   ({ti['pipeline messages per slot']} messages per micro-batch slot at "
        f"{ti['pp link GB/s']:g} GB/s, each after {1e6 * ti['p2p latency (s)']:g} us of latency)",
        "  (no communication overlaps compute)",
        "use it: megalm train CONFIG " + " ".join(lay.overrides()),
    ]
    return lines


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:8.2f} GB"


def to_json(plan: Plan) -> dict:
    def row(e: Estimate) -> dict:
        return {**dataclasses.asdict(e.layout), "fits": e.fits, "memory_gb": e.memory.allocated_gb,
                "peak_at": e.memory.peak_at, "optimizer_path": e.memory.state.path, "step_s": e.time.total_s,
                "tokens_per_s": e.time.tokens_per_s, "mfu": e.time.mfu,
                "memory_inputs": e.memory.inputs, "time_inputs": e.time.inputs}

    return {"model": dataclasses.asdict(plan.cfg.model), "seq_len": plan.cfg.data.seq_len,
            "global_batch": plan.cfg.train.global_batch, "precision": plan.cfg.train.precision,
            "cluster": dataclasses.asdict(plan.cluster), "usable_gb": plan.cluster.usable_gb,
            "refused": {k: {"count": n, "example": msg} for k, (n, msg) in plan.refused.items()},
            "layouts": [row(e) for e in plan.ranked + plan.too_big]}


def main(args) -> int:
    overrides = list(args.overrides)
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.global_batch:
        overrides.append(f"train.global_batch={args.global_batch}")
    cfg, vocab_note, pins = model_config(args.config, overrides, args.vocab)
    try:
        machines = cluster(args.gpu, args.gpus, args.gpus_per_node, args.intra_node_gbs, args.inter_node_gbs,
                           args.efficiency)
    except ValueError as e:
        raise ConfigError(f"megalm plan: {e}") from None
    plan = make_plan(cfg, machines, vocab_note, pins)
    print(report(plan, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(plan), indent=1) + "\n")
        print(f"all {len(plan.ranked) + len(plan.too_big)} layouts in {args.json}")
    return 0 if plan.ranked else 1

"""megalm plan: the memory model against what megalm's layers hold and save and against the measured
peak memory of CPU training runs; the layouts, the ranking and the report.

How memory is measured on a CPU: ``mem_peak_gb`` is the peak resident set, ``mem_base_gb`` the
resident set just before the model is built, so their difference is what training added. Two things
blur it, and the test takes both out:

- glibc keeps freed memory of small and medium allocations in its heap (and raises its mmap threshold
  as tensors are freed), so the resident set remembers a fragmented heap's high-water mark. With
  MALLOC_MMAP_THRESHOLD_=65536 every tensor over 64 KiB gets its own mapping, returned when freed, and
  the resident set follows live tensor bytes, as torch.cuda.max_memory_allocated does on a GPU.
- DeepSpeed imports ~150 MB of modules (triton, sympy, torch._dynamo; ~200 MB with ZeRO) while it
  builds the engine, after the baseline. So each run is paired with the same model cut to one block,
  on the same code path, and the test compares what the other seven blocks add (their weights,
  gradients, optimizer states and activations), measured and estimated. The pair is not a tiny model:
  start-up transients of ~25 MB, there in some runs and not in others, would then make its peak. The
  one-block ZeRO-2 run is one process: what those imports cost does not depend on the number of
  processes (216.3 MB with one, 215.7 MB with two, measured with a tiny model).

The planner is asked for the same device and precision: fp32 on a CPU (no bf16, no CUDA overhead).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megalm.config import ModelConfig, load_config
from megalm.model.layers import Block, Embedding, FinalNorm, Head
from megalm.model.transformer import Transformer, parameter_count
from megalm.observe.flops import flops_per_token
from megalm.parallel.mesh import Mesh
from megalm.parallel.tensor_parallel import TPContext
from megalm.model.pipeline import layer_parameters
from megalm.plan import published
from megalm.plan.hardware import cluster
from megalm.plan.layout import Candidate
from megalm.plan.matmuls import SUSTAINED_SHARE, block_matmuls, share
from megalm.plan.memory import (
    memory,
    model_state,
    saved_by_head,
    saved_per_layer,
    stage_memory,
    stages,
)
from megalm.plan.report import make_plan, model_config, report
from megalm.plan.step_time import P2P_LATENCY_S, matmul_time, step_time
from tests.helpers import CONFIG, TINY, metrics, run_megalm, torchrun

# ------------------------------------------------------------------------ against the layers


def _model(style: str, kv_heads: int = 0, tied: bool = True) -> ModelConfig:
    return ModelConfig(style=style, n_layers=2, d_model=128, n_heads=4, n_kv_heads=kv_heads, vocab_size=512,
                       max_seq_len=64, tie_embeddings=tied)


@pytest.mark.parametrize("style,kv_heads,tied", [("gpt2", 0, True), ("llama", 2, False), ("llama", 1, True)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layer_parameters_are_what_a_tensor_rank_holds(style, kv_heads, tied, tp):
    m = _model(style, kv_heads, tied)
    ctx = TPContext(Mesh(tp=tp, pp=1, dp=1, rank=tp - 1))
    built = [Embedding(m, ctx, 0, 0), *(Block(m, ctx, i + 1, 0) for i in range(m.n_layers)), FinalNorm(m, ctx, 3, 0),
             Embedding(m, ctx, 0, 0) if tied else Head(m, ctx, 4, 0)]  # the pipeline's last stage: a tied copy
    assert layer_parameters(m, tp, pipeline=True) == [sum(p.numel() for p in layer.parameters()) for layer in built]
    if tp == 1:
        assert sum(layer_parameters(m, 1, pipeline=False)) == parameter_count(m)


def _saved_bytes(m: ModelConfig, checkpointing: str, batch: int) -> int:
    """Bytes autograd keeps for backward after a forward of the model (parameters and buffers aside)."""
    model = Transformer(m, checkpointing=checkpointing)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, m.vocab_size, (batch, m.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    return sum(saved.values())


@pytest.mark.parametrize("style,kv_heads", [("gpt2", 0), ("llama", 2)])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_saved_activations_are_what_the_layers_save(style, kv_heads, checkpointing):
    m, batch = _model(style, kv_heads), 2
    tokens = batch * m.max_seq_len
    estimate = (m.n_layers * sum(saved_per_layer(m, tokens, 1, False, checkpointing, "fp32", "cpu").values())
                + sum(saved_by_head(m, tokens, 1, False, "fp32", "cpu").values()))
    measured = _saved_bytes(m, checkpointing, batch)
    # what the formula leaves out: the token ids and labels (int64), a few scalars
    assert estimate <= measured <= estimate + 2 * tokens * 8 + 64


# ------------------------------------------------------------------------ the model in itself


def test_zero_stages_shard_what_they_promise():
    p, shard = 8_000_000, 1_000_000
    for precision in ("fp32", "bf16"):
        one = {z: model_state(precision, z, False, p, 1, 4, "cuda") for z in range(4)}
        eight = {z: model_state(precision, z, False, p, 8, 4, "cuda") for z in range(4)}
        assert eight[0] == one[0]  # ZeRO 0 shards nothing
        for z in (1, 2, 3):  # the master weights and AdamW moments (8 bytes per parameter), over dp
            assert eight[z].moments == one[z].moments / 8 == 8 * shard
            assert eight[z].master == one[z].master / 8
        assert eight[1].weights == one[1].weights and eight[1].accumulated == one[1].accumulated
        assert eight[2].weights == one[2].weights and eight[2].accumulated == one[2].accumulated / 8
        assert eight[3].weights == one[3].weights / 8 and eight[3].accumulated == one[3].accumulated / 8


def test_zero3_holds_20_bytes_per_parameter_over_dp_at_the_step():
    """The ZeRO paper counts 16Ψ/N (bf16 weights and gradients, fp32 master and moments); DeepSpeed's stage 3
    also builds an fp32 partition of the gradients for the optimizer step: 20Ψ/N there, and the report says so."""
    p, dp = 8_000_000, 8
    state = model_state("bf16", 3, False, p, dp, 4, "cuda")
    assert state.weights + state.gradients + state.master + state.moments == 16 * p / dp
    assert state.fp32_gradients == 4 * p / dp and state.at_step == 20 * p / dp
    assert model_state("fp32", 3, False, p, dp, 4, "cuda").at_step == 20 * p / dp  # the partition is the master
    cfg = _cfg("gpt2-125m", "train.precision=bf16", "train.global_batch=64")
    text = report(make_plan(cfg, cluster("h100-sxm", 8), pins={"zero": 3, "tp": 1, "pp": 1}), 1)
    assert "ZeRO-3 model state at the optimizer step: 2.5 bytes per parameter = 20 / dp 8" in text


def _cfg(preset: str, *overrides: str):
    return model_config(preset, list(overrides), 50304)[0]


def test_step_time_parts_follow_their_formulas():
    cfg = _cfg("gpt-1.3b", "train.precision=bf16", "data.seq_len=2048", "train.global_batch=64")
    machines = cluster("h100-sxm", 32)
    piped = step_time(cfg, Candidate(1, 4, 8, 1, 1, "none", False), machines)
    # 1F1B: 8 micro-batches take 8 + 3 slots; interleaving 3 model chunks per GPU leaves 3 / 3
    assert piped.bubble_s / (piped.total_s - piped.dp_s) == pytest.approx(3 / (8 + 3))
    interleaved = step_time(cfg, Candidate(1, 4, 8, 1, 1, "none", False), machines, chunks=3)
    assert interleaved.bubble_s / (interleaved.total_s - interleaved.dp_s) == pytest.approx(1 / (8 + 1))
    assert interleaved.pp_s == pytest.approx(3 * piped.pp_s)
    # zero bubble leaves a third of the bubble: zbv's two chunks a rank (V: rank 0 holds the first and the last)
    zbv = Candidate(1, 4, 8, 1, 1, "none", False, "zbv", 2)
    assert step_time(cfg, zbv, machines).inputs["bubble share"] == pytest.approx((3 / 2 / 3) / (8 + 3 / 2 / 3))
    assert [(s.first, s.last) for s in stages(cfg, zbv)] == [(True, True), (False, False), (False, False),
                                                            (False, False)]
    assert sum(s.blocks for s in stages(cfg, zbv)) == cfg.model.n_layers
    # interleaving holds more in flight on the first rank: ((v - 1) pp + 2 (pp - 1) + 1) / v = 5.5 to 1F1B's 4
    one, two = Candidate(1, 4, 8, 1, 1, "none", False), Candidate(1, 4, 8, 1, 1, "none", False, "interleaved", 2)
    first = [stage_memory(cfg, lay, stages(cfg, lay)[0], "cuda").inputs["micro-batches in flight"] for lay in (one, two)]
    assert first == [4, 5.5]
    # each slot's two messages wait for their latency first (the pipeline crosses nodes: the network's)
    latency = 8 * 2 * P2P_LATENCY_S["network"]
    assert piped.pp_s - latency == pytest.approx(8 * 2 * 2048 * 2048 * 2 / (machines.inter_node_gbs * 1e9))
    plain = step_time(cfg, Candidate(2, 1, 16, 1, 1, "none", False), machines)
    recomputed = step_time(cfg, Candidate(2, 1, 16, 1, 1, "full", False), machines)
    forward = block_matmuls(cfg.model, 1, 2048, 2)
    extra = 4 * cfg.model.n_layers * matmul_time(forward, machines, "bf16")  # 4 micro-batches, every block again
    assert recomputed.compute_s - plain.compute_s == pytest.approx(extra)
    assert recomputed.tp_s == pytest.approx(plain.tp_s * 6 / 4, rel=0.05)  # 2 more all-reduces of 4 per block
    assert plain.dp_s > 0 and plain.pp_s == 0 and piped.pp_s > 0


def test_context_parallelism_splits_a_ranks_tokens_and_adds_its_all_to_alls():
    """Llama-7B at 128K tokens on 64 H100s (the long-context case cp is for): at cp=4 a rank keeps 1/4 of
    a layer's activations, runs 1/4 of the matmuls' FLOPs, and sends per block q, k, v and the output
    forward, their gradients and the output again backward (9 of q's bytes, all 32 heads being key/value
    heads), (cp-1)/cp of them over NVLink; ZeRO shards over the cp ranks too."""
    cfg = _cfg("llama-7b", "train.precision=bf16", "data.seq_len=131072", "model.max_seq_len=131072",
               "train.global_batch=16")
    machines = cluster("h100-sxm", 64)
    whole, split = Candidate(1, 1, 64, 1, 3, "none", False), Candidate(1, 1, 16, 1, 3, "none", False, cp=4)
    kept = [sum(saved_per_layer(cfg.model, 131072, 1, False, "none", "bf16", "cuda", cp).values()) for cp in (1, 4)]
    assert kept[1] == pytest.approx(kept[0] / 4)
    assert memory(cfg, split).inputs["tokens per micro-batch"] == 131072 // 4
    assert memory(cfg, split).state.moments == pytest.approx(memory(cfg, whole).state.moments)  # over 64 ranks both
    flops = [sum(mm.flops for mm in block_matmuls(cfg.model, 1, 131072, 1, cp)) for cp in (1, 4)]
    assert flops[1] == pytest.approx(flops[0] / 4)
    time = step_time(cfg, split, machines)
    q_bytes = 131072 // 4 * 4096 * 2
    per_block = 3 / 4 * 9 * q_bytes / (machines.intra_node_gbs * 1e9)
    assert time.cp_s == pytest.approx(cfg.model.n_layers * per_block) and step_time(cfg, whole, machines).cp_s == 0
    proc = run_megalm("plan", "llama-7b", "train.precision=bf16", "model.max_seq_len=131072", "parallel.cp=4",
                      "--gpu", "h100-sxm", "--gpus", "64", "--seq-len", "131072", "--global-batch", "16", check=False)
    assert "pinned on the command line: parallel.cp=4" in proc.stdout and "MB per block and micro-batch over cp=4" in proc.stdout


def test_matmuls_get_their_share_of_the_peak_from_their_shape():
    m = _cfg("gpt-1.3b", "data.seq_len=2048").model
    forward = block_matmuls(m, 1, 2048, 1)
    # the block's matmuls are the FLOP count's (flops_per_token: 3 x forward, the head aside)
    head = 2 * m.d_model * m.vocab_size
    assert sum(mm.flops for mm in forward) == pytest.approx((flops_per_token(m, 2048) / 3 - head) / m.n_layers * 2048)
    a100 = cluster("a100-80gb", 8)
    big = next(mm for mm in forward if mm.name == "MLP up")
    assert share(a100.gpu, big, "bf16", 2) == pytest.approx(SUSTAINED_SHARE * 267.9 / 312)  # on the plateau
    scores = next(mm for mm in forward if mm.name == "attention scores")  # ~head_dim FLOPs per byte: memory-bound
    assert share(a100.gpu, scores, "bf16", 2) < share(a100.gpu, big, "bf16", 2)
    narrow = next(mm for mm in block_matmuls(dataclasses.replace(m, n_heads=32), 1, 2048, 1)
                  if mm.name == "attention scores")  # head_dim 64
    assert share(a100.gpu, narrow, "bf16", 2) < share(a100.gpu, scores, "bf16", 2)
    # --efficiency replaces the table for every matmul, and the report says which was used
    cfg = _cfg("gpt-1.3b", "train.precision=bf16", "data.seq_len=2048", "train.global_batch=64")
    fixed = step_time(cfg, Candidate(1, 1, 8, 1, 1, "none", False), cluster("a100-80gb", 8, efficiency=0.5))
    assert set(fixed.inputs["matmul shares"].values()) == {0.5}
    assert "every matmul at --efficiency 0.5" in report(make_plan(cfg, cluster("a100-80gb", 8, efficiency=0.5)), 1)
    assert "each matmul at its shape's share" in report(make_plan(cfg, a100), 1)


def test_collectives_cross_the_links_their_ranks_span():
    """rank = (pp_rank * dp + dp_rank) * tp + tp_rank, nodes hold consecutive ranks."""
    machines = cluster("a100-80gb", 64)
    nvlink, card = machines.intra_node_gbs, machines.inter_node_gbs
    assert machines.group_gbs(1, 8) == nvlink  # tp=8: one node
    assert machines.group_gbs(2, 4) == nvlink  # tp=2, dp=4: the dp group stays in its node
    assert machines.group_gbs(8, 8) == card  # tp=8, dp=8: one member per node, one card each
    assert machines.group_gbs(2, 32) == 4 * card  # tp=2: 4 members per node, their 4 cards
    assert machines.group_gbs(1, 64) == min(nvlink, 8 * card)  # every GPU of every node
    assert machines.group_gbs(1, 12, 12) == 4 * card  # ranks 12-23: 4 in one node, 8 in the next


def test_ranking_prefers_plain_data_parallel_for_a_small_model_in_one_node():
    plan = make_plan(_cfg("gpt2-125m", "train.global_batch=512"), cluster("h100-sxm", 8))
    best = plan.ranked[0].layout
    assert (best.tp, best.pp, best.dp) == (1, 1, 8)
    assert [e.time.tokens_per_s for e in plan.ranked] == sorted((e.time.tokens_per_s for e in plan.ranked),
                                                                reverse=True)


def test_planner_holds_to_megatron_lm_table_1():
    """Narayanan et al. 2021, Table 1 (megalm/plan/published.py): the planner's step time, through the paper's
    FLOP count, within 15% of the published TFLOP/s of every run; full recomputation keeps 2sbh bytes a layer
    (Korthikanti et al. 2022), 2sbhL on the first stage, which holds pp micro-batches; every run fits."""
    print("\nMegatron-LM, Table 1 (A100 80GB, 312 TFLOP/s), published against the planner:")
    print("\n".join(published.table()))
    for run in published.TABLE_1:
        time, mem = published.predict(run)
        assert abs(published.predicted_tflops(run, time) / run.tflops - 1) <= 0.15, run
        cfg, lay = published.config(run), published.layout(run)
        sbh = 2048 * run.hidden * 2
        per_layer = saved_per_layer(cfg.model, 2048, run.tp, False, "full", "bf16", "cuda")
        assert sum(per_layer.values()) == sbh
        first = stage_memory(cfg, lay, stages(cfg, lay)[0], "cuda")
        kept = first.inputs["micro-batches in flight"] * first.stage.blocks * sbh
        assert abs(kept / (sbh * run.layers) - 1) <= 0.10, run
        assert mem.allocated_gb <= cluster("a100-80gb", 8).usable_gb


def test_ranking_prefers_data_to_pipeline_parallelism_where_megatron_measured_it():
    """Narayanan et al. 2021, Figure 14: a 5.9B GPT (32 layers, 32 heads, hidden 3840) on 64 A100s, tp 1,
    micro-batch 1: throughput falls as pp grows at every batch size. The planner once ranked pp=8 x dp=8
    first (it sent the data-parallel all-reduce over one network card)."""
    for batch in (128, 512):
        cfg, _, pins = model_config("gpt-1.3b", ["model.n_layers=32", "model.d_model=3840", "model.n_heads=32",
                                                 "model.vocab_size=51200", "data.seq_len=2048", "train.precision=bf16",
                                                 f"train.global_batch={batch}", "parallel.tp=1",
                                                 "train.micro_batch_size=1"], 51200)
        plan = make_plan(cfg, cluster("a100-80gb", 64), pins=pins)
        best = {}
        for e in plan.ranked:
            best.setdefault(e.layout.pp, e.time.tokens_per_s)
        assert plan.ranked[0].layout.pp < 8 and best[2] > best[8]
        assert [best[pp] for pp in sorted(best)] == sorted(best.values(), reverse=True), best


def test_layouts_that_do_not_fit_are_left_out():
    cfg = _cfg("llama-7b", "train.precision=bf16", "data.seq_len=2048", "train.global_batch=64")
    plan = make_plan(cfg, cluster("a100-40gb", 8))
    usable = plan.cluster.usable_gb
    assert plan.ranked and plan.too_big
    assert all(e.memory.allocated_gb <= usable for e in plan.ranked)
    assert all(e.memory.allocated_gb > usable for e in plan.too_big)
    # 16 bytes a parameter of model state alone cannot fit 6.7B parameters on one 40 GB GPU
    assert all(e.layout.zero > 0 or e.layout.tp * e.layout.pp > 1 for e in plan.ranked)
    alone = make_plan(cfg, cluster("l40s", 1))
    assert not alone.ranked
    assert "nothing fits in" in report(alone, 5)


def test_layout_fields_given_on_the_command_line_are_the_ones_estimated():
    """Pinned fields hold in every layout weighed; all pinned, the one layout is estimated, or the line
    that refuses it is shown; pp=8 with the config's default ZeRO 0 is weighed, not refused at load."""
    proc = run_megalm("plan", "gpt-1.3b", "train.precision=bf16", "parallel.tp=8", "parallel.pp=8",
                      "train.micro_batch_size=1", "parallel.pp_schedule=interleaved", "--gpus", "64", "--seq-len",
                      "2048", "--global-batch", "512", "--json", "/dev/stdout", check=False)
    assert ("pinned on the command line: parallel.tp=8, parallel.pp=8, train.micro_batch_size=1, "
            "parallel.pp_schedule=interleaved") in proc.stdout, proc.stdout
    rows = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])["layouts"]
    assert rows and all((r["tp"], r["pp"], r["dp"], r["micro_batch"], r["schedule"], r["chunks"]) ==
                        (8, 8, 1, 1, "interleaved", 2) for r in rows)
    assert {r["zero"] for r in rows} == {1}  # bf16 with ZeRO 0 refused with pp, 2-3 too
    one = run_megalm("plan", "llama-7b", "parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "train.zero_stage=0",
                     "train.micro_batch_size=8", "parallel.activation_checkpointing=none", "--gpu", "a100-40gb",
                     "--gpus", "8", check=False)
    assert one.returncode == 1 and "layouts: 1 accepted by megalm's checks, 0 fit" in one.stdout
    assert "nothing fits in 34.2 GB: the smallest pinned layout needs " in one.stdout
    refused = run_megalm("plan", "gpt-1.3b", "parallel.tp=16", "--gpus", "64", check=False)
    assert refused.returncode == 1 and ("parallel.tp=16: tensor parallelism stays inside a node of 8 GPUs"
                                        in refused.stdout)


def test_cli_prints_the_ranking_and_the_inputs(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_megalm("plan", "gpt-1.3b", "train.precision=bf16", "--gpu", "h100-sxm", "--gpus", "8", "--seq-len",
                      "2048", "--global-batch", "64", "--top", "5", "--json", str(out))
    text = proc.stdout
    assert "vocab 50304 from --vocab 50304" in text
    first = json.loads(out.read_text())["layouts"][0]
    row = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    assert f"{first['tokens_per_s']:,.0f}" in row and f"{first['memory_gb']:.2f}" in row
    for needed in ("rank  tp  cp  pp", "layout #1", "AdamW moments", "saved per block and micro-batch", "MLP up",
                   "attention scores", "LM head", "norms, residual adds", "bubble", "cp comm",
                   "dp comm", "messages per micro-batch slot", "no communication overlaps compute"):
        assert needed in text
    use = next(line for line in text.splitlines() if line.startswith("use it: megalm train CONFIG "))
    overrides = use.split("CONFIG ")[1].split()
    chosen = load_config("configs/quickstart.yaml", ["model=gpt-1.3b", *overrides]).parallel
    assert (chosen.tp, chosen.pp, chosen.cp) == (first["tp"], first["pp"], first["cp"])


# --------------------------------------------------------------------- against measured runs

MODEL = ["model.d_model=320", "model.n_heads=5", "data.seq_len=256", "train.micro_batch_size=4"]
RUNS = {  # name: (processes, overrides); each with its one-block pair on the same code path
    "none": (1, ["model.n_layers=8", "train.global_batch=4"]),
    "full": (1, ["model.n_layers=8", "train.global_batch=4", "parallel.activation_checkpointing=full"]),
    "zero2-dp2": (2, ["model.n_layers=8", "train.global_batch=8", "train.zero_stage=2"]),
    "one-block": (1, ["model.n_layers=1", "train.global_batch=4"]),
    "one-block-zero2": (1, ["model.n_layers=1", "train.global_batch=4", "train.zero_stage=2"]),
}
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def cpu_runs(data_args, tmp_path_factory, monkeypatch_module):
    """Every run of RUNS, 2 steps each, at once: {name: (run dir, processes)}."""
    monkeypatch_module.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # see the module docstring
    root = tmp_path_factory.mktemp("plan")

    def run(name):
        nproc, extra = RUNS[name]
        args = ["train", CONFIG, *TINY, *data_args, *MODEL, *extra, f"train.run_dir={root / name}", "train.steps=2",
                "train.warmup_steps=1", "train.save=false", "train.resume=never", "data.eval_sequences=1"]
        if nproc == 1:
            run_megalm(*args)
        else:
            torchrun(nproc, *args)
        return name, (root / name, nproc)

    with ThreadPoolExecutor(len(RUNS)) as pool:
        return dict(pool.map(run, RUNS))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _measured_gb(run_dir: Path) -> float:
    last = [r for r in metrics(run_dir) if "mem_peak_gb" in r][-1]
    return last["mem_peak_gb"] - last["mem_base_gb"]


def _estimated_gb(run_dir: Path, dp: int) -> float:
    cfg = load_config(run_dir / "config.yaml")  # as trained: vocabulary and length resolved
    t, p = cfg.train, cfg.parallel
    layout = Candidate(p.tp, p.pp, dp, t.micro_batch_size, t.zero_stage, p.activation_checkpointing,
                       p.sequence_parallel)
    return memory(cfg, layout, device="cpu").allocated_gb


@pytest.mark.parametrize("name,pair", [("none", "one-block"), ("full", "one-block"), ("zero2-dp2", "one-block-zero2")])
def test_memory_model_against_measured_cpu_runs(cpu_runs, name, pair):
    (run_dir, nproc), (pair_dir, pair_nproc) = cpu_runs[name], cpu_runs[pair]
    measured = _measured_gb(run_dir) - _measured_gb(pair_dir)
    estimated = _estimated_gb(run_dir, nproc) - _estimated_gb(pair_dir, pair_nproc)
    error = (estimated - measured) / measured
    print(f"\nmemory model, {name}: estimated {estimated:.3f} GB, measured {measured:.3f} GB "
          f"(7 blocks over the one-block model on the same path), error {100 * error:+.1f}%")
    assert abs(error) <= TOLERANCE

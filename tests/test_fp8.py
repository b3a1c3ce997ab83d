"""FP8 linear layers (train.fp8, megalm/model/fp8.py), emulated on this CPU (torchao's float8 training
with high-precision matmuls: the same casts and scales): which layers are converted and why, on
timing tables recorded by ``megalm bench kernels``; losses against bf16; checkpoints crossing
between FP8 and bf16 both ways; what FP8 does not compose with."""

import json
import shutil
import time

import pytest
import torch

from megalm.config import load_config
from megalm.errors import ConfigError
from megalm.model import fp8
from megalm.model.transformer import Transformer
from megalm_kernels.fp8_linear import Float8Product
from megalm_kernels.provenance import device_name
from tests.helpers import CONFIG, REPO, TINY, run_megalm, torchrun, train_losses

CPU = torch.device("cpu")
FP8 = ["train.precision=bf16", "train.fp8.layers=all", "train.fp8.emulate=true"]
STEPS = ["train.steps=12", "train.save_every=6", "train.eval_every=6", "train.warmup_steps=2"]


def _model(*overrides: str):
    cfg = load_config(REPO / CONFIG, [*TINY, "model.vocab_size=512", "model.max_seq_len=32", "train.precision=bf16",
                                      "train.fp8.emulate=true", *overrides])
    return cfg, Transformer(cfg.model)


def test_auto_converts_the_shapes_a_recorded_table_shows_faster(tmp_path):
    """``megalm bench kernels --ops fp8`` times this model's two linear shapes on this CPU (emulated FP8:
    slower), and auto keeps every layer in bf16, naming the speedup; the same table with FP8 made
    faster for the MLP's shapes converts those layers only; a table of another device is refused."""
    cfg, model = _model("train.fp8.layers=auto")
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    shapes = sorted({fp8.shape(m, tokens) for m in fp8.block_linears(model).values()})
    run_megalm("bench", "kernels", "--quick", "--ops", "fp8", "--out", str(tmp_path), "--linears",
               ",".join("x".join(map(str, s)) for s in shapes))
    table = tmp_path / "kernels.json"
    recorded = json.loads(table.read_text())
    assert {r["impl"] for r in recorded["rows"]} == {"bf16", "fp8-tensorwise", "fp8-rowwise"}

    timed, _ = _model("train.fp8.layers=auto", f"train.fp8.timings={table}")
    said = fp8.convert(model, timed, tokens, CPU, device_name(CPU))
    assert said.startswith(f"fp8: 0 of 10 block linears on this rank in FP8 (tensorwise scaling, emulated; "
                           f"speedups from {table})"), said
    assert "kept in bf16: FP8 runs at 0." in said and "x bf16's speed here (< train.fp8.min_speedup=1.05)" in said

    mlp = {s for name, m in fp8.block_linears(model).items() if ".mlp." in name for s in [fp8.shape(m, tokens)]}
    for row in recorded["rows"]:
        if tuple(map(int, row["shape"].split("x"))) in mlp and row["impl"] != "bf16":
            row["ms"] = row["ms"] / 1000  # as a GPU with FP8 would time a large enough shape
    table.write_text(json.dumps(recorded))
    _, model = _model("train.fp8.layers=auto")
    said = fp8.convert(model, timed, tokens, CPU, device_name(CPU))
    converted = {name for name, m in fp8.block_linears(model).items() if isinstance(m.product, Float8Product)}
    assert converted == {f"blocks.{i}.mlp.{part}" for i in range(2) for part in ("up", "down")}, said
    assert said.startswith("fp8: 4 of 10 block linears"), said

    recorded["meta"]["device"] = "NVIDIA H100 80GB HBM3"
    table.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match="train.fp8.timings: .* was timed on NVIDIA H100 80GB HBM3, this run is on"):
        fp8.convert(model, timed, tokens, CPU, device_name(CPU))
    cfg, _ = _model("train.fp8.layers=all", "train.fp8.emulate=false")
    with pytest.raises(ConfigError, match="train.fp8.layers=all: FP8 matmuls need a CUDA GPU with FP8"):
        fp8.check_device(cfg, CPU)


@pytest.fixture(scope="module")
def bf16_run(data_args, tmp_path_factory):
    """The reference: one process, bf16, 12 steps saved at 6."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    run_megalm("train", CONFIG, *TINY, *data_args, *STEPS, "train.precision=bf16", f"train.run_dir={run_dir}")
    return run_dir


def _close(losses, reference, rel=0.01):
    """Each step's loss within ``rel`` of the reference's (which may have trained further)."""
    return 0 < len(losses) <= len(reference) and max(abs(a - b) / b for a, b in zip(losses, reference)) < rel


@pytest.mark.slow
def test_fp8_trains_within_1pct_of_bf16_on_any_layout_and_checkpoints_cross_both_ways(bf16_run, data_args, tmp_path):
    """Every block linear in FP8 at tp=2 (no SP) x dp=2 with ZeRO 3 for 6 steps, then resumed on one
    process in bf16 (FP8 -> bf16); the bf16 run's step-6 checkpoint resumed in FP8 with rowwise
    scaling (bf16 -> FP8): every step's loss within 1% of the bf16 run's."""
    args = ["train", CONFIG, *TINY, *data_args, *STEPS]
    run_dir = tmp_path / "fp8"
    log = torchrun(4, *args, *FP8, "parallel.tp=2", "train.zero_stage=3", "train.micro_batch_size=2",
                   "train.stop_at=6", f"train.run_dir={run_dir}").stderr
    assert "layout: tp=2 x dp=2 x pp=1" in log, log[-2000:]
    assert "fp8: 10 of 10 block linears on this rank in FP8 (tensorwise scaling, emulated; speedups not timed" in log
    reference = train_losses(bf16_run)
    assert len(train_losses(run_dir)) == 6 and _close(train_losses(run_dir), reference), train_losses(run_dir)
    run_megalm(*args, "train.precision=bf16", f"train.run_dir={run_dir}")  # FP8 -> bf16, on one process
    assert len(train_losses(run_dir)) == 12 and _close(train_losses(run_dir), reference), train_losses(run_dir)

    crossed = tmp_path / "bf16-fp8"
    shutil.copytree(bf16_run, crossed)
    shutil.rmtree(crossed / "checkpoints" / "step_00000012")
    (crossed / "checkpoints" / "latest").write_text("step_00000006")
    log = run_megalm(*args, *FP8, "train.fp8.recipe=rowwise", f"train.run_dir={crossed}").stderr  # bf16 -> FP8
    assert "resume: from" in log and "(rowwise scaling" in log, log[-2000:]
    assert len(train_losses(crossed)) == 12 and _close(train_losses(crossed), reference), train_losses(crossed)
    assert train_losses(crossed) != reference  # (its last 6 steps did run in FP8)


def test_fp8_on_a_cpu_is_refused_through_megalm_train(data_args, tmp_path):
    """As a user meets it: megalm train with FP8 asked for on a machine without FP8 matmuls (not
    emulated) stops before training with one line naming the key and the way out, exit code 2."""
    started = time.monotonic()
    proc = run_megalm("train", CONFIG, *TINY, *data_args, "train.precision=bf16", "train.fp8.layers=auto",
                      f"train.run_dir={tmp_path / 'run'}", check=False)
    took = time.monotonic() - started
    line = ("megalm: config error: train.fp8.layers=auto: FP8 matmuls need a CUDA GPU with FP8 (Hopper, Ada or "
            "newer), this run is on cpu; train.fp8.emulate=true runs the same casts with high-precision matmuls")
    assert proc.returncode == 2 and line in proc.stderr, proc.stderr[-2000:]
    assert took < 30, took


@pytest.mark.parametrize("overrides, message", [
    (["train.fp8.layers=all"], "train.fp8.layers=all: FP8 matmuls run in a bf16 run"),
    (["train.precision=bf16", "train.fp8.layers=auto", "parallel.tp=2", "parallel.sequence_parallel=true"],
     "train.fp8.layers=auto: not with parallel.sequence_parallel=true"),
    (["train.precision=bf16", "train.fp8.layers=all", "parallel.cp=2"], "train.fp8.layers=all: not with parallel.cp=2"),
])
def test_what_fp8_does_not_compose_with_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / CONFIG, overrides)

"""Training end to end through the real entry points: loss falls, data parallel and every ZeRO
stage reproduce one process, a checkpoint reloads to the same model, and generate is reproducible
(resuming is tested in test_checkpoint.py)."""

import json
import math

import pytest
import torch

from megalm.checkpoint import catalog
from megalm.data.prepare import read_manifest
from megalm.sampling import load_model
from tests.helpers import CONFIG, TINY, compare_parameters, metrics, run_megalm, torchrun, train_losses


def test_run_dir_has_everything(single_run):
    rows = metrics(single_run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"} <= set(r)
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["tflops_per_gpu"] > 0 and r["mfu"] is None and r["mem_peak_gb"] > 0  # a CPU has no MFU
        assert 0 <= r["data_wait_fraction"] < 1 and r["bad_shards"] == 0
        parts = r["step_breakdown_s"]  # the logged step's phases fit inside its time
        assert set(parts) == {"data", "forward", "backward", "optimizer"} and all(v > 0 for v in parts.values())
        assert sum(parts.values()) <= r["step_time_s"]
    assert steps[-1]["tokens"] == 6 * 4 * 32
    trace = json.loads((single_run / "profile/trace-rank0.json").read_text())  # train.profile.steps=[2,3]
    marked = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("megalm step")}
    assert marked == {"megalm step 2", "megalm step 3"}
    assert "aten::mm" in (single_run / "profile/top-rank0.txt").read_text()
    # the logged lr is the one the step used: linear warmup over 2 steps to 3e-3, then cosine down
    assert [r["lr"] for r in steps[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert steps[-1]["lr"] == pytest.approx(2e-4)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    for name in ["config.yaml", "loss.png", "tokenizer.json", "checkpoints/latest"]:
        assert (single_run / name).is_file(), name
    assert [p.name for p in catalog.complete_checkpoints(single_run / "checkpoints")] == ["step_00000003", "step_00000006"]


def test_loss_falls(data_dir, data_args, tmp_path):
    run_dir = tmp_path / "run"
    run_megalm("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.steps=200",
               "train.warmup_steps=10", "train.eval_every=200", "train.log_every=10", "train.lr=5e-3",
               "train.global_batch=16", "train.micro_batch_size=16", "data.seq_len=64", "model.d_model=96",
               # on this small corpus the final val loss moves by ~0.2 with the data order (4.93-5.21 for
               # seeds 1, 2, 1234); the seed is fixed so the test measures the model, not the draw
               "data.seed=1")
    losses = train_losses(run_dir)
    val = [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r]
    entropy = read_manifest(data_dir).unigram_entropy_nats
    assert losses[-1] < losses[0] - 0.7, losses
    assert val[-1] < entropy - 0.2, (val, entropy)  # it uses context, not just token frequencies


def test_checkpoint_reloads_to_the_same_model(single_run, data_dir, tmp_path):
    model, ckpt = load_model(single_run)
    assert ckpt.name == "step_00000006"
    meta = catalog.verify(ckpt)
    from megalm.config import DataConfig
    from megalm.data.dataset import open_sources
    from megalm.data.loader import validation_sequences

    val = validation_sequences(open_sources(DataConfig(dir=str(data_dir), seq_len=32), 4), 16, tmp_path)
    with torch.no_grad():
        loss = sum(model(b[:, :-1], b[:, 1:]).double() * len(b) for b in val.split(4)) / len(val)
    trained_val = [r["val_loss"] for r in metrics(single_run) if "val_loss" in r][-1]
    assert loss.item() == pytest.approx(trained_val, rel=1e-6)
    assert meta.step == 6 and meta.state["train"]["tokens"] == 6 * 4 * 32


def test_generate_is_reproducible(single_run):
    args = ["generate", str(single_run), "--prompt", "def ", "--max-tokens", "20", "--temperature", "1.0"]
    a = run_megalm(*args, "--seed", "1").stdout
    b = run_megalm(*args, "--seed", "1").stdout
    c = run_megalm(*args, "--seed", "2").stdout
    assert a == b and a != c and a.startswith("def ")


@pytest.mark.slow
def test_data_parallel_and_zero_stages_match_one_process(single_run, data_args, tmp_path):
    """2 processes over gloo with the same global batch reproduce the one-process losses (fp32),
    for ZeRO stages 0-3."""
    reference = train_losses(single_run)[:5]
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"zero{stage}"
        torchrun(2, "train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}",
                 "train.micro_batch_size=2", f"train.zero_stage={stage}", "train.steps=6", "train.save_every=3",
                 "train.eval_every=3")
        losses = train_losses(run_dir)[:5]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        assert rel < 1e-5, f"ZeRO {stage}: {losses} vs {reference}"
        # weights consolidated from each stage's shards (ZeRO-3: DeepSpeed's zero_to_fp32) agree too
        param_rel, param_worst = compare_parameters(run_dir, single_run)
        assert param_rel < 1e-5 and param_worst < 1e-4, f"ZeRO {stage}: parameters ({param_rel}, {param_worst})"


def test_training_needs_only_the_prepared_dir(single_run, data_dir, tmp_path):
    """Training takes a prepared directory as its manifest says it was made; `megalm prepare`
    refuses to overwrite it with other settings."""
    log = run_megalm("train", CONFIG, *TINY, f"data.dir={data_dir}", "data.vocab_size=600", "train.steps=2",
                     "train.warmup_steps=1", "train.eval_every=2", f"train.run_dir={tmp_path / 'run'}").stderr
    assert f"data: {data_dir} was prepared from directory" in log and "vocab 512" in log
    proc = run_megalm("prepare", CONFIG, *TINY, f"data.dir={data_dir}", "data.vocab_size=600", check=False)
    assert proc.returncode == 1
    assert "already holds data prepared with other settings" in proc.stderr
    assert "data.vocab_size=600 here, 512 there" in proc.stderr


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_tracks_fp32(single_run, data_args, tmp_path, zero_stage):
    """bf16 (DeepSpeed keeps fp32 master weights) follows the fp32 losses to bf16 precision."""
    run_dir = tmp_path / "bf16"
    run_megalm("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.precision=bf16",
               f"train.zero_stage={zero_stage}", "train.steps=6", "train.eval_every=3")
    losses, reference = train_losses(run_dir), train_losses(single_run)
    assert all(math.isfinite(x) for x in losses)
    assert max(abs(a - b) / b for a, b in zip(losses, reference)) < 2e-2, (losses, reference)
    assert load_model(run_dir)[0].embed.tok.weight.dtype == torch.float32  # sampling runs in fp32


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_torch_compile_sees_a_block_as_one_graph(style):
    """The kernel choice (megalm_kernels.dispatch) is a constant of the traced graph: no break at every
    norm and attention (where its logging was traced, a gpt2 block was 6 graphs and compiled twice)."""
    import torch._dynamo

    from megalm.config import ModelConfig
    from megalm.model.transformer import Transformer

    cfg = ModelConfig(style=style, n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
    explained = torch._dynamo.explain(Transformer(cfg).blocks[0])(torch.randn(2, 32, 64, requires_grad=True))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_blocks_train_like_eager(single_run, data_args, tmp_path):
    """train.compile: torch.compile of every block gives the eager run's losses."""
    run_dir = tmp_path / "compiled"
    log = run_megalm("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.steps=6",
                     "train.stop_at=3", "train.eval_every=100", "train.compile=true").stderr
    assert "compile: torch.compile on 2 Transformer blocks" in log
    assert train_losses(run_dir) == pytest.approx(train_losses(single_run)[:3], rel=1e-5)

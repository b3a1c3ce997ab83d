"""Checkpoints that cannot lose work: exact resume (losses bit for bit, same data), kill -9 at any
moment, corruption detected and skipped, resume on another layout, async equal to sync,
retention, refused model changes, and the Hugging Face round trip with ``transformers``."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import catalog
from megalm.checkpoint.meta import CheckpointMeta
from tests.helpers import CONFIG, REPO, TINY, env, metrics, run_megalm, torchrun, train_losses


def rows_by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run dir whose config.yaml points at the copy."""
    shutil.copytree(run, to)
    config = to / "config.yaml"
    config.write_text(config.read_text().replace(str(run), str(to)))
    return to


def test_resume_is_bit_exact_with_the_same_data(single_run, tmp_path):
    """Preempted after step 3 (its last checkpoint is gone, a torn save lies beside it): the rerun
    repeats steps 4-6 with identical losses and identical batches."""
    run_dir = copy_run(single_run, tmp_path / "resumed")
    shutil.rmtree(run_dir / "checkpoints/step_00000006")
    (run_dir / "checkpoints/.tmp.step_00000006").mkdir()
    (run_dir / "checkpoints/latest").write_text("step_00000006")  # as if the rename had happened but not meta
    proc = run_megalm("train", str(run_dir / "config.yaml"))
    assert "resume: from" in proc.stderr and "step_00000003" in proc.stderr
    original, resumed = rows_by_step(single_run), rows_by_step(run_dir)
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == original[step]["loss"], step  # CPU fp32: bit for bit
        assert resumed[step]["data_hash"] == original[step]["data_hash"], step


def test_async_save_writes_what_sync_save_writes(single_run, data_args, tmp_path):
    run_dir = tmp_path / "sync"
    run_megalm("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.steps=6", "train.save_every=3",
               "train.eval_every=3", "train.async_save=false")
    for step in ("step_00000003", "step_00000006"):
        a = CheckpointMeta.read(single_run / "checkpoints" / step)
        b = CheckpointMeta.read(run_dir / "checkpoints" / step)
        assert a.files == b.files  # every file, byte for byte (sizes and xxh3 checksums)
        assert a.state == b.state and a.step == b.step


def test_kill_9_at_any_moment_then_resume(data_args, tmp_path):
    """Two trials: SIGKILL while a checkpoint is being written, and at a random moment; every
    time `latest` names a checkpoint that verifies, and resuming ends on the uninterrupted losses."""
    args = [CONFIG, *TINY, *data_args, "train.steps=8", "train.save_every=1", "train.eval_every=100"]
    reference = tmp_path / "reference"
    run_megalm("train", *args, f"train.run_dir={reference}")
    expected = rows_by_step(reference)
    rng = random.Random(0)
    for trial in range(2):
        run_dir = tmp_path / f"trial{trial}"
        cmd = [sys.executable, "-m", "megalm.cli", "train", *args, f"train.run_dir={run_dir}"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        checkpoints = run_dir / "checkpoints"
        deadline = time.time() + 120
        if trial == 0:  # while the first save is being written
            while not (checkpoints.is_dir() and any(p.name.startswith(".tmp.") for p in checkpoints.iterdir())):
                assert proc.poll() is None and time.time() < deadline, "no save started"
                time.sleep(0.001)
        else:  # a random moment once training runs
            while not (run_dir / "metrics.jsonl").is_file():
                assert proc.poll() is None and time.time() < deadline, "training did not start"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (checkpoints / "latest").is_file():
            named = checkpoints / (checkpoints / "latest").read_text()
            catalog.verify(named)  # never a torn latest
        run_megalm("train", *args, f"train.run_dir={run_dir}")
        got = rows_by_step(run_dir)
        assert sorted(got) == list(range(1, 9)), trial
        for step in expected:
            assert got[step]["loss"] == expected[step]["loss"], (trial, step)


def test_a_corrupt_byte_is_found_and_the_previous_checkpoint_used(single_run, tmp_path):
    run_dir = copy_run(single_run, tmp_path / "corrupt")
    data = run_dir / "checkpoints/step_00000006/rank_00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    verify = run_megalm("ckpt", "verify", str(run_dir), check=False)
    assert verify.returncode == 1
    assert f"FAILED  {data.parent}: {data}: checksum" in verify.stdout
    assert "ok      " in verify.stdout  # step 3 is fine
    listing = run_megalm("ckpt", "list", str(run_dir)).stdout
    assert "step_00000003" in listing and "corrupt" in listing
    proc = run_megalm("train", str(run_dir / "config.yaml"))
    assert f"cannot resume from step_00000006: {data}: checksum" in proc.stderr
    assert "resume: from" in proc.stderr and "step_00000003" in proc.stderr
    assert [rows_by_step(run_dir)[s]["loss"] for s in (4, 5, 6)] == [rows_by_step(single_run)[s]["loss"] for s in (4, 5, 6)]


@pytest.mark.slow
def test_resume_on_other_layouts_continues_the_curve(single_run, data_args, tmp_path):
    """One run, four layouts: tp=2 ZeRO 1 -> one process ZeRO 2 -> dp=2 ZeRO 3 -> one process ZeRO 0.
    Each resume reassembles the checkpoint (fp32 masters, both Adam moments, its step) for the new
    layout; the curve stays on the one-process run's to 1e-5. (Pipelines resume across pipeline sizes
    and schedules in tests/test_pipeline.py.)"""
    run_dir = tmp_path / "run"
    base = [CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.steps=6", "train.eval_every=3"]
    legs = [(2, ["parallel.tp=2", "train.zero_stage=1"]), (1, ["train.zero_stage=2"]),
            (2, ["train.zero_stage=3", "train.micro_batch_size=2"]), (1, ["train.zero_stage=0"])]
    for stop_at, (nproc, layout) in enumerate(legs, start=3):
        args = [*base, *layout, f"train.stop_at={stop_at}" if stop_at < 6 else "train.stop_at=0"]
        log = torchrun(nproc, "train", *args).stderr if nproc > 1 else run_megalm("train", *args).stderr
        if stop_at > 3:
            assert "reassembled for" in log
    reference, got = rows_by_step(single_run), rows_by_step(run_dir)
    for step in range(1, 7):
        assert got[step]["data_hash"] == reference[step]["data_hash"], step
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 10):
        (root / catalog.tag(step)).mkdir(parents=True)
        (root / catalog.tag(step) / CheckpointMeta.FILE).write_text("{}")
    resumed_from = root / catalog.tag(2)
    doomed = catalog.to_delete(root, newest=9, keep_last=2, keep_every=4, protected={resumed_from})
    assert [p.name for p in doomed] == [catalog.tag(s) for s in (1, 3, 5, 6, 7)]
    # a checkpoint past the newest step (left by a rewound run) is neither counted nor removed
    assert catalog.tag(9) not in [p.name for p in catalog.to_delete(root, 8, 1, 0, set())]


def test_a_changed_model_or_tokenizer_is_refused(single_run, tmp_path):
    run_dir = copy_run(single_run, tmp_path / "changed")
    proc = run_megalm("train", str(run_dir / "config.yaml"), "model.n_layers=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "megalm: config error: train.resume: ") and "holds another model (model.n_layers=3 here, 2 there)" in proc.stderr
    proc = run_megalm("train", str(run_dir / "config.yaml"), "train.steps=7", "train.lr=1e-3")
    assert "resume: config changes since step_00000006: " in proc.stderr
    assert "train.lr 0.003 -> 0.001" in proc.stderr and "train.steps 6 -> 7" in proc.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r][-1] == 7


# ------------------------------------------------------------------------------ Hugging Face


def logits_of_megalm(path, ids):
    from megalm.sampling import load_model

    model, _ = load_model(path)
    with torch.no_grad():
        return model(ids)


def test_export_to_transformers_gives_the_same_logits(single_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    run_megalm("ckpt", "export", str(single_run), str(out))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1)")])
    with torch.no_grad():
        diff = (model(ids).logits - logits_of_megalm(single_run, ids)).abs().max().item()
    assert diff < 1e-4, diff
    run_megalm("ckpt", "export", str(single_run), str(tmp_path / "model.pt"), "--format", "torch")
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert saved["model_config"]["n_layers"] == 2 and "blocks.1.mlp.up.weight" in saved["state_dict"]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_import_from_transformers_and_back(style, data_dir, tmp_path):
    """A model made by transformers (Llama with grouped-query attention; GPT-2 with a vocabulary
    that is not a multiple of 128) imports with the same logits, exports back to the same tensors."""
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizer.json"),
                                               eos_token="<|endoftext|>")
    torch.manual_seed(0)
    if style == "llama":
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    source = tmp_path / "source"
    model.eval().save_pretrained(source)
    tok.save_pretrained(source)
    imported = tmp_path / "imported"
    run_megalm("ckpt", "import", str(source), str(imported))
    ids = torch.tensor([tok.encode("import os\nprint(os.getcwd())")])
    with torch.no_grad():
        theirs = model(ids).logits
    assert (logits_of_megalm(imported, ids) - theirs).abs().max().item() < 1e-4
    back = tmp_path / "back"
    run_megalm("ckpt", "export", str(imported), str(back))
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert (again(ids).logits - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_continue_pretraining_an_imported_model_with_tensor_parallelism(data_dir, data_args, tmp_path):
    """GPT-2 layout, vocabulary padded to 128 on import; trains on with tp=2 from its weights."""
    import transformers

    torch.manual_seed(0)
    source = tmp_path / "source"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=500, n_positions=32, n_embd=64, n_layer=2,
                                                         n_head=4)).save_pretrained(source)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizer.json"),
                                         eos_token="<|endoftext|>").save_pretrained(source)
    imported = tmp_path / "imported"
    run_megalm("ckpt", "import", str(source), str(imported), "--pad-vocab", "128")
    assert json.loads((imported / CheckpointMeta.FILE).read_text())["config"]["model"]["vocab_size"] == 512
    run_dir = tmp_path / "run"
    log = torchrun(2, "train", CONFIG, *TINY, *data_args, f"model={imported / 'model.yaml'}", "parallel.tp=2",
                   f"train.resume={imported}", f"train.run_dir={run_dir}", "train.steps=3").stderr
    assert "reassembled for tp=2" in log and "holds no train state; it starts fresh" in log
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]
    # the first step's loss is the imported model's on the first batch (not a fresh init's)
    from megalm.config import BatchLayout, DataConfig
    from megalm.data.dataset import open_sources
    from megalm.data.loader import TrainLoader
    from megalm.sampling import load_model
    from megalm.train.objective import CausalLM

    loader = TrainLoader(open_sources(DataConfig(dir=str(data_dir), seq_len=32), 4), BatchLayout(4, 1, 4, 1), 0,
                         CausalLM(), num_workers=0)
    model, _ = load_model(imported)
    with torch.no_grad():
        expected = torch.stack([model(x, y) for x, y in next(loader).micro_batches]).mean().item()
    assert train_losses(run_dir)[0] == pytest.approx(expected, rel=1e-5)


def test_bench_ckpt_measures_against_the_raw_disk(tmp_path):
    out = tmp_path / "results"
    run_megalm("bench", "ckpt", "--model", "tiny", "--quick", "--dir", str(tmp_path / "disk"), "--out", str(out))
    result = json.loads((out / "ckpt.json").read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert rows["disk: raw sequential write (fsync)"]["gb_per_s"] > 0
    sync = rows["save, synchronous"]
    assert sync["vs_raw"] == pytest.approx(sync["gb_per_s"] / rows["disk: raw sequential write (fsync)"]["gb_per_s"])
    assert result["meta"]["checkpoint_bytes"] > result["meta"]["host_copy_bytes"] > 0
    assert "save, async: training stalled" in (out / "ckpt.md").read_text()
    assert not (tmp_path / "disk").exists()  # the benchmark cleans up after itself


FAILING_SAVE = """
import sys
from pathlib import Path
from megalm.bench.ckpt import build, forward_backward
from megalm.checkpoint import store
from megalm.errors import CheckpointError
from megalm.train.state import TrainState

def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

run_dir = Path(sys.argv[1])
engine, mesh, cfg, tokenizer, device = build("tiny", run_dir)
checkpointer = store.Checkpointer(run_dir, engine, mesh, cfg, tokenizer, shared={"train": TrainState(1)}, per_rank={})
store.write_rank = full_disk
checkpointer.save(1)  # returns at once: the write fails in the background
forward_backward(engine, cfg, device)
try:
    checkpointer.before_step()  # the next optimizer update
except CheckpointError as e:
    print("raised:", e)
"""


def test_a_failed_background_write_stops_training_at_the_next_step(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FAILING_SAVE, str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=300)
    assert "raised: saving step_00000001 failed on rank 0: OSError: [Errno 28] No space left on device" in proc.stdout, \
        proc.stderr[-3000:]
    assert not (tmp_path / "run/checkpoints/latest").exists()
    assert catalog.complete_checkpoints(tmp_path / "run/checkpoints") == []

"""``megalm eval`` (loss, perplexity and bits per byte of a checkpoint on a held-out split, on any
layout) and ``megalm finetune --task lm`` (continued pretraining from a checkpoint or an imported
Hugging Face model, on a corpus prepared with its tokenizer)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megalm.checkpoint import catalog, hf
from megalm.checkpoint.meta import CheckpointMeta
from megalm.checkpoint.shards import CheckpointReader
from megalm.config import BatchLayout, DataConfig, load_config
from megalm.data.dataset import open_sources
from megalm.data.loader import TrainLoader, validation_sequences
from megalm.data.prepare import prepare
from megalm.data.sources import python_stdlib_root
from megalm.data.tokenizer import EOT, load_tokenizer, token_byte_lengths
from megalm.errors import ConfigError
from megalm.commands.finetune import lm_config
from megalm.sampling import load_model
from megalm.model.transformer import Transformer
from megalm.observe.metrics import drop_metrics_after, read_metrics
from megalm.observe.plot import plot_runs
from megalm.train.objective import CausalLM
from megalm.train.schedule import lr_at
from tests.helpers import metrics, run_megalm, torchrun, train_losses

# ------------------------------------------------------------------------------ megalm eval


@pytest.fixture(scope="module")
def run_copy(single_run, tmp_path_factory) -> Path:
    """single_run, copied: megalm eval appends to a run's metrics, and other tests read single_run's."""
    return Path(shutil.copytree(single_run, tmp_path_factory.mktemp("eval") / "run"))


def evaluate(*args: str, out: Path, launch=run_megalm) -> tuple[dict, str]:
    proc = launch("eval", *args, "--json", str(out))
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def evaluated(run_copy, data_dir) -> tuple[dict, str]:
    """The run's newest checkpoint on the whole validation split, one process: (results, stdout)."""
    return evaluate(str(run_copy), "--data", str(data_dir), out=run_copy.parent / "all.json")


def test_eval_reports_perplexity_and_bits_and_appends_to_the_runs_metrics(evaluated, run_copy, data_dir, tmp_path):
    result, printed = evaluated
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bits_per_token"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    index = json.loads((data_dir / "index.json").read_text())
    held_out = sum(s["tokens"] + s["samples"] for s in index["val"])  # documents and their end-of-text
    assert result["sequences"] == held_out // 33 and result["tokens"] == 32 * result["sequences"]
    assert result["step"] == 6 and result["layout"] == "tp=1 pp=1 dp=1 zero=0"
    header, row = printed.strip().splitlines()[-2:]
    assert header.split()[1:] == ["sequences", "tokens", "bytes", "loss", "ppl", "bits/token", "bits/byte", "layout"]
    assert f"{result['loss']:.4f}" in row and f"{result['bpb']:.4f}" in row
    rows = [r for r in read_metrics(run_copy) if r.get("eval_sequences") == result["sequences"]]
    assert rows and rows[0]["step"] == 6 and rows[0]["eval_loss"] == result["loss"]
    assert rows[0]["eval_bpb"] == result["bpb"] and rows[0]["eval_data"] == str(data_dir)
    # the readers of metrics.jsonl take the row in their stride
    assert plot_runs([run_copy], ["loss", "eval_loss"], tmp_path / "curves.png") is not None
    drop_metrics_after(run_copy, 6)
    assert rows[0] in read_metrics(run_copy)


def test_bits_per_byte_by_hand(evaluated, single_run, data_dir):
    """The same sequences scored in plain torch, their bytes counted by decoding them."""
    result, _ = evaluated
    sources = open_sources(DataConfig(dir=str(data_dir), seq_len=32), 4)
    val = validation_sequences(sources, result["sequences"], data_dir.parent / "spool")
    model, ckpt = load_model(single_run)
    with torch.no_grad():
        logits = model(val[:, :-1]).double()
    nats = F.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten(), reduction="sum").item()
    tok = load_tokenizer(ckpt / "tokenizer.json")
    text_bytes = sum(len(tok.decode(row.tolist()).encode()) for row in val[:, 1:])  # end-of-text decodes to nothing
    assert result["bytes"] == text_bytes
    assert result["loss"] == pytest.approx(nats / val[:, 1:].numel(), rel=1e-6)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)


def test_token_byte_lengths_count_utf8_bytes(data_dir):
    tok = load_tokenizer(data_dir)  # a prepared directory stands for its tokenizer.json
    lengths = token_byte_lengths(tok)
    text = "héllo wörld ✓\n\tdef f(): return '€'"
    assert lengths[tok.encode(text).ids].sum() == len(text.encode()) != len(text)
    assert lengths[tok.token_to_id(EOT)] == 0


def test_eval_of_the_checkpoint_equals_the_runs_own_validation_loss(single_run, run_copy, data_dir):
    """Asked for the run's own validation sequences (data.eval_sequences=16, as it trained with)."""
    val_loss = [r["val_loss"] for r in metrics(single_run) if "val_loss" in r][-1]
    result, _ = evaluate(str(run_copy / "checkpoints" / "step_00000006"), "--data", str(data_dir),
                         "data.eval_sequences=16", out=run_copy.parent / "16.json")
    assert result["sequences"] == 16
    assert result["loss"] == pytest.approx(val_loss, rel=1e-6)


@pytest.mark.parametrize("split, layout", [("parallel.tp=2", "tp=2 pp=1 dp=1 zero=0"),
                                           ("parallel.cp=2", "tp=1 pp=1 dp=2 zero=0")])  # (cp ranks shard as dp)
def test_eval_with_tensor_or_context_parallelism_equals_one_process(evaluated, run_copy, data_dir, split, layout):
    expected, _ = evaluated
    result, _ = evaluate(str(run_copy), "--data", str(data_dir), split, out=run_copy.parent / f"{split}.json",
                         launch=lambda *args: torchrun(2, *args))
    assert result["layout"] == layout
    assert (result["sequences"], result["tokens"], result["bytes"]) == \
        (expected["sequences"], expected["tokens"], expected["bytes"])
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert result["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)


# ------------------------------------------------------------------------------ megalm finetune --task lm

DOMAIN_FILES = ["fractions.py", "statistics.py", "operator.py", "contextlib.py", "dataclasses.py", "enum.py",
                "functools.py", "shutil.py"]


def stdlib_corpus(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True)
    for name in names:
        shutil.copy(python_stdlib_root() / name, root / name)
    return root


@pytest.fixture(scope="module")
def domain_dir(single_run, tmp_path_factory) -> Path:
    """Other standard-library modules, prepared with single_run's tokenizer (named by its run dir)."""
    root = tmp_path_factory.mktemp("domain")
    out = root / "prepared"
    run_megalm("prepare", f"data.source={stdlib_corpus(root / 'corpus', DOMAIN_FILES)}", f"data.dir={out}",
               f"data.tokenizer={single_run}", "data.shard_tokens=4000")
    return out


def finetune(ckpt: Path, data: Path, run_dir: Path, *overrides: str, check: bool = True):
    return run_megalm("finetune", str(ckpt), "--task", "lm", "--data", str(data), f"train.run_dir={run_dir}",
                      *overrides, check=check)


@pytest.fixture(scope="module")
def finetuned(single_run, domain_dir, tmp_path_factory) -> Path:
    """single_run's checkpoint trained on for its own 6 steps (its settings) on the domain corpus."""
    run_dir = tmp_path_factory.mktemp("finetuned") / "run"
    assert "init: weights from" in finetune(single_run, domain_dir, run_dir).stderr
    return run_dir


def first_batch_loss(model: Transformer, data: Path) -> float:
    """The model's loss on the first batch of a run with single_run's data settings."""
    loader = TrainLoader(open_sources(DataConfig(dir=str(data), seq_len=32), 4), BatchLayout(4, 1, 4, 1), 0,
                         CausalLM(), num_workers=0)
    with torch.no_grad():
        return torch.stack([model(x, y) for x, y in next(loader).micro_batches]).mean().item()


def test_finetune_starts_from_the_weights_with_a_fresh_optimizer(finetuned, single_run, domain_dir):
    model, ckpt = load_model(single_run)
    rows = [r for r in metrics(finetuned) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["loss"] == pytest.approx(first_batch_loss(model, domain_dir), rel=1e-5)
    assert first_batch_loss(Transformer(model.cfg), domain_dir) > rows[0]["loss"] + 0.1  # a fresh init's
    cfg = load_config(finetuned / "config.yaml")
    assert rows[0]["lr"] == pytest.approx(lr_at(cfg.train, 0)) and cfg.train.warmup_steps == 2  # warming up again
    assert cfg.to_dict()["model"] == CheckpointMeta.read(ckpt).config["model"]
    assert cfg.train.init_from == str(ckpt.resolve()) and cfg.data.dir == str(domain_dir)


def test_finetune_config_defaults(single_run, domain_dir, tmp_path):
    ckpt = catalog.resolve(single_run)
    cfg = lm_config(ckpt, str(domain_dir), False, ["model.dropout=0.1"])
    assert cfg.train.run_dir == f"runs/{single_run.name}-lm-{domain_dir.name}"
    assert (cfg.train.steps, cfg.train.global_batch, cfg.data.seq_len, cfg.model.dropout) == (6, 4, 32, 0.1)
    assert cfg.train.profile.steps == [] and cfg.train.init_keep_optimizer is False
    with pytest.raises(ConfigError, match="train.init_from: both it and train.resume"):
        lm_config(ckpt, str(domain_dir), False, [f"train.resume={ckpt}"])


def test_keep_optimizer_carries_adams_moments_and_step_count(finetuned, single_run, domain_dir, tmp_path):
    ckpt = catalog.resolve(single_run)
    refused = finetune(single_run, domain_dir, tmp_path / "refused", "--keep-optimizer", check=False)
    assert refused.returncode == 2 and "e.g. train.steps=12" in refused.stderr
    run_dir = tmp_path / "kept"
    finetune(single_run, domain_dir, run_dir, "--keep-optimizer", "train.steps=7")
    (row,) = [r for r in metrics(run_dir) if "loss" in r]
    assert row["step"] == 7 and row["loss"] == train_losses(finetuned)[0]  # same weights, same first batch
    assert row["lr"] == pytest.approx(lr_at(load_config(run_dir / "config.yaml").train, 6))  # no warmup again
    before = CheckpointReader(ckpt, CheckpointMeta.read(ckpt))
    meta = CheckpointMeta.read(run_dir / "checkpoints" / "step_00000007")
    after = CheckpointReader(run_dir / "checkpoints" / "step_00000007", meta)
    assert (before.adam_step, after.adam_step) == (6, 7)
    assert meta.state["train"]["step"] == 7 and meta.state["data"]["step"] == 1  # the data starts over
    beta2 = load_config(run_dir / "config.yaml").train.beta2
    for name in before.names():  # v' = beta2 v + (1 - beta2) g^2 >= beta2 v: the old second moment goes on
        v_old, v_new = before.local(name, None, 0, 1)[2], after.local(name, None, 0, 1)[2]
        assert torch.all(v_new >= beta2 * v_old * (1 - 1e-6)), name


def test_finetune_an_imported_hugging_face_model(finetuned, single_run, domain_dir, tmp_path):
    hf.export_hf(catalog.resolve(single_run), tmp_path / "hf")
    imported = hf.import_hf(tmp_path / "hf", tmp_path / "imported")
    run_dir = tmp_path / "run"
    finetune(imported, domain_dir, run_dir, "train.steps=2", "train.warmup_steps=1", "train.global_batch=4",
             "train.micro_batch_size=4", "train.log_every=1", "train.progress=false", "train.wandb.mode=disabled")
    assert train_losses(run_dir)[0] == pytest.approx(train_losses(finetuned)[0], rel=1e-5)


def test_a_mismatched_tokenizer_is_refused_with_the_fix(single_run, tmp_path):
    other = tmp_path / "other"
    prepare(DataConfig(source=str(stdlib_corpus(tmp_path / "corpus", DOMAIN_FILES[:3])), dir=str(other),
                       vocab_size=300, shard_tokens=4000, prepare_workers=1))
    proc = finetune(single_run, other, tmp_path / "run", check=False)
    ckpt = catalog.resolve(single_run)
    assert proc.returncode == 2 and f"than the data's ({other}/tokenizer.json)" in proc.stderr
    assert f"megalm prepare data.tokenizer={ckpt / 'tokenizer.json'}" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_interrupted_finetune_resumes_exactly(finetuned, single_run, domain_dir, tmp_path):
    run_dir = tmp_path / "run"
    finetune(single_run, domain_dir, run_dir, "train.stop_at=3")
    assert "resume: from" in finetune(single_run, domain_dir, run_dir).stderr
    assert trained(run_dir) == trained(finetuned)


def trained(run_dir: Path) -> list[tuple]:
    """Each step's loss and the fingerprint of its batch."""
    return [(r["step"], r["loss"], r["data_hash"]) for r in metrics(run_dir) if "loss" in r]

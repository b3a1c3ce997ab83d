"""The masked-LM objective: masking statistics and determinism, the loss on masked positions only,
bidirectional attention, and a tiny masked model that learns and equals one process under tp x pp."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megalm.common import IGNORE
from megalm.config import DataConfig, ModelConfig, load_config
from megalm.data.dataset import open_sources
from megalm.data.loader import validation_sequences
from megalm.sampling import load_model
from megalm.model.transformer import Transformer
from megalm.train.objective import EVAL_STEP, CausalLM, MaskedLM, build_objective
from tests.helpers import CONFIG, TINY, metrics, run_megalm, torchrun, train_losses

SPECIALS = [0, 1]  # end-of-text and mask, as in megalm's trained tokenizers
MASK = 1


def masker(**shares) -> MaskedLM:
    return MaskedLM(MASK, SPECIALS, 500, seed=7, prob=shares.get("prob", 0.15),
                    token_share=shares.get("token_share", 0.8), random_share=shares.get("random_share", 0.1))


def test_masking_statistics_specials_and_labels():
    rows, length = 400, 501
    tokens = torch.randint(2, 500, (rows, length))
    tokens[:, ::50] = 0  # documents' end-of-text tokens: never chosen
    inputs, labels = masker().examples(tokens, None, step=3, rows=torch.arange(rows))
    x = tokens[:, :-1]
    chosen = labels != IGNORE
    n = int((x != 0).sum())
    assert chosen.sum() / n == pytest.approx(0.15, abs=0.004)  # ~200k positions: 5 standard deviations
    assert not chosen[x == 0].any()
    assert torch.equal(labels[chosen], x[chosen])
    as_mask, unchanged = inputs[chosen] == MASK, inputs[chosen] == x[chosen]
    random = ~as_mask & ~unchanged
    k = int(chosen.sum())
    assert as_mask.sum() / k == pytest.approx(0.8, abs=0.01)
    # a random draw may hit the original token (1 in 498): it then counts as unchanged
    assert random.sum() / k == pytest.approx(0.1 * 497 / 498, abs=0.008)
    assert unchanged.sum() / k == pytest.approx(0.1 + 0.1 / 498, abs=0.008)
    assert not torch.isin(inputs[chosen][random], torch.tensor(SPECIALS)).any()
    assert torch.equal(inputs[~chosen], x[~chosen])  # what is not chosen is untouched


def test_masks_depend_only_on_step_and_place_in_the_batch():
    """Any split of the global batch over ranks (and any resume) masks each row the same way."""
    tokens = torch.randint(2, 500, (8, 65))
    whole = masker().examples(tokens, None, step=5, rows=torch.arange(8))
    halves = [masker().examples(tokens[r], None, step=5, rows=torch.arange(8)[r]) for r in (slice(0, 3), slice(3, 8))]
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    other_step = masker().examples(tokens, None, step=6, rows=torch.arange(8))
    assert not torch.equal(whole[1], other_step[1])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[5:] = False  # padding rows carry no labels
    _, labels = masker().examples(tokens, valid, step=5, rows=torch.arange(8))
    assert (labels[5:] == IGNORE).all() and torch.equal(labels[:5], whole[1][:5])


def test_masked_loss_counts_masked_positions_only_and_attention_is_bidirectional():
    cfg = ModelConfig(vocab_size=512, max_seq_len=32, n_layers=2, d_model=64, n_heads=4, objective="masked")
    model = Transformer(cfg)
    tokens = torch.randint(2, 512, (3, 33))
    inputs, labels = masker().examples(tokens, None, step=0, rows=torch.arange(3))
    logits = model(inputs)
    chosen = labels != IGNORE
    expected = F.cross_entropy(logits[chosen], labels[chosen])
    assert model(inputs, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # a later token changes earlier positions' outputs (not so for the causal model)
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])
    causal = Transformer(ModelConfig(vocab_size=512, max_seq_len=32, n_layers=2, d_model=64, n_heads=4))
    assert torch.equal(causal(changed)[:, 0], causal(inputs)[:, 0])
    causal_inputs, causal_labels = CausalLM().examples(tokens, None, 0, torch.arange(3))
    assert torch.equal(causal_labels, tokens[:, 1:]) and torch.equal(causal_inputs, tokens[:, :-1])


MASKED = ["model.objective=masked", "train.steps=20", "train.eval_every=10", "train.warmup_steps=2",
          "train.global_batch=16", "train.micro_batch_size=8", "train.lr=5e-3"]


@pytest.fixture(scope="module")
def masked_run(data_args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("masked") / "run"
    run_megalm("train", CONFIG, *TINY, *MASKED, *data_args, f"train.run_dir={run_dir}")
    return run_dir


def test_tiny_masked_model_learns(masked_run, data_dir, tmp_path):
    losses = train_losses(masked_run)
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # near-uniform guesses at first
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    evals = [r for r in metrics(masked_run) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    # the logged accuracy and loss are the final model's on the validation sequences, masked for evaluation
    model, _ = load_model(masked_run)
    val = validation_sequences(open_sources(DataConfig(dir=str(data_dir), seq_len=32), 16), 16, tmp_path)
    inputs, labels = build_objective(load_config(masked_run / "config.yaml"), data_dir / "tokenizer.json").examples(
        val, None, EVAL_STEP, torch.arange(len(val)))
    with torch.no_grad():
        logits = model(inputs)
    chosen = labels != IGNORE
    assert evals[-1]["val_accuracy"] == pytest.approx((logits.argmax(-1)[chosen] == labels[chosen]).float().mean().item())
    assert evals[-1]["val_loss"] == pytest.approx(F.cross_entropy(logits[chosen], labels[chosen]).item(), rel=1e-5)
    # megalm eval scores the same masked positions: the same loss and accuracy
    scored = json.loads(run_megalm("eval", str(masked_run), "--data", str(data_dir), "data.eval_sequences=16",
                                   "--json", str(tmp_path / "eval.json")) and (tmp_path / "eval.json").read_text())
    assert scored["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)
    assert scored["accuracy"] == pytest.approx(evals[-1]["val_accuracy"])
    out = run_megalm("generate", str(masked_run), "--prompt", "def", check=False)
    assert out.returncode == 1 and "cannot generate" in out.stderr


@pytest.mark.slow
def test_masked_tensor_and_pipeline_parallel_equal_one_process(masked_run, data_args, tmp_path):
    run_dir = tmp_path / "tp2pp2"
    torchrun(4, "train", CONFIG, *TINY, *MASKED, *data_args, f"train.run_dir={run_dir}", "parallel.tp=2",
             "parallel.pp=2", "train.zero_stage=1", "parallel.sequence_parallel=true", "train.micro_batch_size=2")
    losses, expected = train_losses(run_dir), train_losses(masked_run)
    assert max(abs(a - b) / b for a, b in zip(losses, expected)) < 1e-5, (losses, expected)
    got, want = ([r for r in metrics(d) if "val_loss" in r][-1] for d in (run_dir, masked_run))
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["val_accuracy"] == want["val_accuracy"]

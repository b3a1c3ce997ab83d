"""Fine-tuning for classification: ``megalm finetune --task classify`` from the tiny pretrained run on
chunks of two standard-library packages (``megalm finetune-example``'s code), its scores against
scikit-learn's, exact resume across data-parallel sizes, ``megalm classify``, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megalm.commands.finetune_example import build_example
from megalm.common import PAD
from megalm.config import ModelConfig
from megalm.data.labelled import read_records, targets
from megalm.errors import DataError
from megalm.model.classifier import pooled
from megalm.model.transformer import Transformer
from megalm.observe.classification import report
from tests.helpers import metrics, run_megalm, torchrun, train_losses

# 60 steps of 32 texts of at most 32 tokens: about six epochs of the 320 training chunks
FINETUNE = ["train.steps=60", "train.global_batch=32", "train.micro_batch_size=32", "train.lr=1e-3",
            "train.min_lr=1e-4", "train.warmup_steps=5", "train.log_every=1", "train.eval_every=30",
            "train.progress=false", "train.wandb.mode=disabled", "train.plot=false"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """160 training and 40 evaluation chunks each of `email` and `asyncio` sources (files split)."""
    out = tmp_path_factory.mktemp("example")
    counts = build_example(out, classes={"email": ["email"], "asyncio": ["asyncio"]}, min_chars=150,
                           max_chars=300, max_per_class=160)
    assert counts == {"train": {"email": 160, "asyncio": 160}, "eval": {"email": 40, "asyncio": 40}}
    return out


def finetune(launch, ckpt, example, run_dir, *overrides):
    return launch("finetune", str(ckpt), "--task", "classify", "--train", str(example / "train.jsonl"),
                  "--eval", str(example / "eval.jsonl"), *FINETUNE, f"train.run_dir={run_dir}", *overrides)


@pytest.fixture(scope="module")
def classifier(single_run, example, tmp_path_factory):
    """The reference: one process, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("classify") / "run"
    finetune(run_megalm, single_run, example, run_dir, "train.plot=true")
    return run_dir


def test_finetuned_classifier_beats_the_majority_baseline(classifier):
    scores = json.loads((classifier / "eval.json").read_text())
    # seen: 0.85-0.89 over three seeds, against 0.50 for always guessing the majority label
    assert scores["accuracy"] >= scores["majority_baseline"]["accuracy"] + 0.2, scores
    assert scores["examples"] == 80 and scores["labels"] == ["asyncio", "email"]
    png = (classifier / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    rows = metrics(classifier)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 61))
    evaluations = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evaluations] == [30, 60] and evaluations[-1]["val_accuracy"] == scores["accuracy"]


def test_scores_equal_scikit_learns():
    """On predictions where one label is never predicted and another never occurs (zero divisions)."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    truth = rng.choice([0, 1, 2], size=200, p=[0.5, 0.3, 0.2])  # "d" never occurs
    guesses = rng.choice([0, 1, 3], size=200)  # "c" never predicted
    predicted = np.where((rng.random(200) < 0.6) & (truth != 2), truth, guesses)
    scores = report(labels, truth, predicted, majority=0)
    every = list(range(len(labels)))
    assert scores["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert scores["confusion"] == confusion_matrix(truth, predicted, labels=every).tolist()
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=every, zero_division=0)
    for i, label in enumerate(labels):
        ours = scores["per_class"][label]
        assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx([p[i], r[i], f[i]])
        assert ours["support"] == support[i]
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=every, average=average, zero_division=0)
        assert [scores[average][k] for k in ("precision", "recall", "f1")] == pytest.approx([p, r, f])
    assert scores["per_class"]["c"]["precision"] == 0 and scores["per_class"]["d"]["recall"] == 0
    assert scores["majority_baseline"] == {"label": "a", "accuracy": pytest.approx(np.mean(truth == 0))}


@pytest.mark.slow
def test_resume_is_exact_whatever_the_data_parallel_size(classifier, single_run, example, tmp_path):
    """Stopped at step 30 and resumed on one process: the uninterrupted run's losses bit for bit.
    Stopped at step 30 by 2 processes and finished by 1: the same to float rounding (2 ranks sum
    the global batch in another order)."""
    reference = train_losses(classifier)
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(run_megalm, single_run, example, one, "train.stop_at=30")
    assert not (one / "eval.json").exists()  # stopped before the end: no final scores yet
    assert "from step 30" in finetune(run_megalm, single_run, example, one).stderr
    assert train_losses(one) == reference
    scored = [json.loads((run / "eval.json").read_text()) for run in (one, classifier)]
    assert scored[0]["confusion"] == scored[1]["confusion"]
    finetune(lambda *args: torchrun(2, *args), single_run, example, two, "train.stop_at=30")
    evaluated = [[r["val_accuracy"] for r in metrics(run) if r["step"] == 30 and "val_accuracy" in r]
                 for run in (two, classifier)]
    assert evaluated[0] == evaluated[1]  # the evaluation set split over 2 ranks and gathered
    assert "from step 30" in finetune(run_megalm, single_run, example, two).stderr
    losses = train_losses(two)
    assert len(losses) == 60
    rel = [abs(a - b) / b for a, b in zip(losses, reference)]
    # seen: 3e-6 over the 2-process steps; training amplifies the rounding to 2e-4 by step 60
    assert max(rel[:30]) < 1e-5 and max(rel) < 1e-3, f"{losses} vs {reference}"


@pytest.mark.slow
def test_tensor_sequence_and_pipeline_parallel_classifiers_equal_one_process(classifier, single_run, example,
                                                                             tmp_path):
    """The same classifier under tp=2 with sequence parallelism and under pp=2 (the head on the last
    stage, its scores collected by the loss and sent to every stage): one process's losses and its
    evaluation, to float rounding."""
    reference = train_losses(classifier)[:4]
    evaluations = []
    for layout in (["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2", "train.micro_batch_size=16"]):
        run_dir = tmp_path / layout[0]
        finetune(lambda *args: torchrun(2, *args), single_run, example, run_dir, *layout, "train.steps=60",
                 "train.stop_at=4", "train.eval_every=4")
        losses = train_losses(run_dir)
        assert max(abs(a - b) / b for a, b in zip(losses, reference)) < 1e-5, (layout, losses, reference)
        (row,) = [r for r in metrics(run_dir) if "val_accuracy" in r]
        evaluations.append((row["val_loss"], row["val_accuracy"]))
    # the same weights scored two ways: tensor shards with the sequence gathered, and pipeline stages
    assert evaluations[0][1] == evaluations[1][1] and evaluations[0][0] == pytest.approx(evaluations[1][0], rel=1e-5)


def test_classify_predicts_what_eval_json_scored(classifier, example):
    scores = json.loads((classifier / "eval.json").read_text())
    proc = run_megalm("classify", str(classifier), "--input", str(example / "eval.jsonl"))
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    records = read_records(example / "eval.jsonl")
    assert [r["line"] for r in rows] == [r.line for r in records] and all(sum(r["probs"].values()) ==
                                                                          pytest.approx(1, abs=1e-5) for r in rows)
    right = sum(r["label"] == r["expected"] for r in rows)
    assert right / len(rows) == pytest.approx(scores["accuracy"])
    assert f"accuracy {scores['accuracy']:.4f} on the 80 labelled records" in proc.stderr
    predicted = [scores["labels"].index(r["label"]) for r in rows]
    truth = [scores["labels"].index(r.label) for r in records]
    assert report(scores["labels"], truth, predicted, 0)["confusion"] == scores["confusion"]
    texts = run_megalm("classify", str(classifier), "--text", "await asyncio.sleep(0)", "--text",
                       "msg['Subject'] = email.header.Header(subject)").stdout.splitlines()
    assert len(texts) == 2 and all(line.split("\t")[0] in scores["labels"] for line in texts)


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_logits_do_not_depend_on_padding(objective):
    """The head reads the last real token (causal) or the first (masked, whose attention skips the
    padding): more padding after a text changes nothing."""
    cfg = ModelConfig(objective=objective, n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16,
                      labels=["a", "b", "c"])
    model = Transformer(cfg, seed=1).eval()

    def read(ids):
        return pooled(model(ids), targets(ids, torch.zeros(len(ids), dtype=torch.int64), objective == "causal")[:, 1])

    ids = torch.randint(0, 64, (2, 8))
    ids[1, 5:] = PAD
    longer = torch.cat([ids, torch.full((2, 8), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(read(longer), read(ids))
        torch.testing.assert_close(read(ids[1:, :5]), read(ids)[1:])


def test_bad_input_is_named_by_file_and_line(single_run, example, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "import email", "label": "email"}\n\n{"text": "import asyncio"}\n')
    proc = run_megalm("finetune", str(single_run), "--task", "classify", "--train", str(bad), "--eval",
                      str(example / "eval.jsonl"), f"train.run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and f"{bad}:3: no label" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # refused at the start: no empty run dir left behind
    for text, problem in [("", "holds no records"), ('{"text": "x", "label": "a"}\n{"text": ', ":2: not valid JSON"),
                          ('{"text": "", "label": "a"}\n', ":1: no text"), ('["x", "a"]\n', ":1: expected a JSON object")]:
        bad.write_text(text)
        with pytest.raises(DataError, match=problem):
            read_records(bad)
    other = finetune(lambda *a: run_megalm(*a, check=False), single_run, example, tmp_path / "other", "model.n_layers=3")
    assert other.returncode == 2 and "holds another model (model.n_layers=3 here, 2 there)" in other.stderr, \
        other.stderr[-2000:]

"""How well a classifier does on labelled examples: accuracy, per-class precision, recall and F1,
their macro (every class alike) and weighted (by support) averages, the majority-class baseline,
and the confusion matrix, as numbers (eval.json) and as a picture (confusion.png).

Where a ratio has nothing to divide by it is 0, as scikit-learn's ``zero_division=0``: the
precision of a class never predicted, the recall of a class that never occurs, and F1 where both
precision and recall are 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """Counts (n_labels, n_labels): row i, column j holds the examples of class i predicted as j."""
    counts = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def report(labels: list[str], truth, predicted, majority: int) -> dict:
    """The scores of ``predicted`` against ``truth`` (class indices into ``labels``); ``majority``
    is the class a constant guess would pick (the training set's most frequent one)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    counts = confusion_matrix(truth, predicted, len(labels))
    hits, support, guessed = np.diag(counts), counts.sum(axis=1), counts.sum(axis=0)
    precision, recall = _ratio(hits, guessed), _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    weights = support / max(support.sum(), 1)
    return {
        "examples": int(len(truth)),
        "accuracy": float(hits.sum() / max(len(truth), 1)),
        "majority_baseline": {"label": labels[majority], "accuracy": float(np.mean(truth == majority))},
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                     "f1": float(f1 @ weights)},
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "labels": list(labels),
        "confusion": counts.tolist(),
    }


def plot_confusion(scores: dict, out: Path, title: str = "") -> Path:
    """The confusion matrix of ``report`` as a PNG: counts in the cells, true labels down the side,
    predicted ones along the bottom."""
    from matplotlib.figure import Figure  # not pyplot: see megalm/observe/plot.py

    counts, labels = np.array(scores["confusion"]), scores["labels"]
    side = 2.5 + 0.6 * len(labels)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    dark = counts.max() / 2
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > dark else "black")
    ax.set_title(title or f"accuracy {scores['accuracy']:.3f} (majority baseline "
                          f"{scores['majority_baseline']['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out

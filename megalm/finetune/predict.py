"""``megalm classify RUN_DIR``: labels and class probabilities from a fine-tuned classifier.

``--text T`` (repeatable) prints, per text, the predicted label, its probability and every class's.
``--input FILE.jsonl`` writes one JSON line per record to stdout (``line``, the predicted ``label``,
``probs`` by class, and ``expected`` where the record has a label); when records carry labels, the
accuracy goes to stderr, so stdout stays one prediction per line.
"""

from __future__ import annotations

import json
import sys

import torch

from megalm.checkpoint.store import TOKENIZER
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import ConfigError
from megalm.finetune.classifier import class_log_probs, load_classifier
from megalm.finetune.labelled import encode_texts, read_records
from megalm.parallel.distributed import pick_device

BATCH = 64  # texts per forward pass


def main(args) -> int:
    if not args.text and not args.input:
        raise ConfigError("megalm classify: give --text TEXT (repeatable) or --input FILE.jsonl")
    if any(not text.strip() for text in args.text or []):
        raise ConfigError("megalm classify: --text is empty; give some text to classify")
    device = pick_device(args.device, option="--device")
    model, finetune, ckpt = load_classifier(args.run_dir, device)
    tok, labels = load_tokenizer(ckpt / TOKENIZER), finetune.labels

    def probs(texts: list[str]) -> torch.Tensor:
        return class_log_probs(model, encode_texts(tok, texts, finetune.max_len), BATCH, device).exp()

    for text, p in zip(args.text or [], probs(args.text) if args.text else []):
        best = int(p.argmax())
        classes = "  ".join(f"{label} {q:.3f}" for label, q in zip(labels, p.tolist()))
        print(f"{labels[best]}\t{p[best]:.3f}\t[{classes}]\t{_preview(text)}")
    if args.input:
        records = read_records(args.input, need_label=False)
        right = labelled = 0
        for record, p in zip(records, probs([r.text for r in records])):
            row = {"line": record.line, "label": labels[int(p.argmax())],
                   "probs": {label: round(q, 6) for label, q in zip(labels, p.tolist())}}
            if record.label is not None:
                row["expected"] = record.label
                labelled += 1
                right += row["label"] == record.label
            print(json.dumps(row))
        if labelled:
            print(f"megalm classify: accuracy {right / labelled:.4f} on the {labelled} labelled records of "
                  f"{args.input} ({right} right)", file=sys.stderr)
    return 0


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"

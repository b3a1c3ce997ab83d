"""``megalm classify RUN_DIR``: labels and class probabilities from a fine-tuned classifier.

``--text T`` (repeatable) prints, per text, the predicted label, its probability and every class's.
``--input FILE.jsonl`` writes one JSON line per record to stdout (``line``, the predicted ``label``,
``probs`` by class, and ``expected`` where the record has a label); when records carry labels, the
accuracy goes to stderr, so stdout stays one prediction per line.
"""

import json
import sys

BATCH = 64  # texts per forward pass


def add(sub) -> None:
    sp = sub.add_parser("classify", help="predict labels with a fine-tuned classifier (megalm finetune --task classify)")
    sp.add_argument("run_dir", help="the fine-tuning run dir (or one of its checkpoints)")
    sp.add_argument("--text", action="append", help="a text to classify (repeatable)")
    sp.add_argument("--input", help="a .jsonl file of {text} records; predictions go to stdout as jsonl")
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=run)


def run(args) -> int:
    import torch

    from megalm.checkpoint.meta import CheckpointMeta
    from megalm.checkpoint.store import TOKENIZER
    from megalm.data.labelled import encode_texts, read_records
    from megalm.data.tokenizer import load_tokenizer
    from megalm.errors import UsageError
    from megalm.parallel.distributed import pick_device
    from megalm.sampling import class_log_probs, load_model

    if not args.text and not args.input:
        raise UsageError("megalm classify: give --text TEXT (repeatable) or --input FILE.jsonl")
    if any(not text.strip() for text in args.text or []):
        raise UsageError("megalm classify: --text is empty; give some text to classify")
    device = pick_device(args.device, option="--device")
    model, ckpt = load_model(args.run_dir, device, classifier=True)
    tok, labels = load_tokenizer(ckpt / TOKENIZER), model.cfg.labels
    max_len = CheckpointMeta.read(ckpt).config.get("classify", {}).get("max_len") or model.cfg.max_seq_len

    def probs(texts: list[str]) -> torch.Tensor:
        return class_log_probs(model, encode_texts(tok, texts, max_len), BATCH, device).exp()

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

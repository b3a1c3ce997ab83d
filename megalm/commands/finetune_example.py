"""``megalm finetune-example OUT_DIR``: a labelled set any machine with Python can build, for
trying ``megalm finetune --task classify`` on the quickstart model.

Each record is a chunk of a standard-library source file (whole lines, ``min_chars`` to
``max_chars`` characters), labelled by the package it comes from (``CLASSES``): mail handling
(``email``), asynchronous I/O (``asyncio``) and processes and threads (``multiprocessing``,
``concurrent``). The last two share much vocabulary (futures, queues, locks, workers), so the task
is learnable but not trivial. Whole files go to one split: ranked by size, every fifth file of a
class (the 3rd, 8th, …) goes to the evaluation set (about a fifth of the chunks), so no evaluation
chunk comes from a file seen in training. The output depends only on the Python version's sources
and the arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megalm.data.sources import python_stdlib_root

CLASSES = {"email": ["email"], "asyncio": ["asyncio"], "multiprocessing": ["multiprocessing", "concurrent"]}
EVAL_EVERY, EVAL_FIRST = 5, 2  # by size, files 2, 7, 12, … (from 0) of a class are held out for evaluation


def chunks(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Runs of whole lines of at least ``min_chars`` characters, cut at ``max_chars``; a short tail
    (under half of ``min_chars``) is dropped."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= min_chars:
            out.append(current[:max_chars])
            current = ""
    if len(current.strip()) >= min_chars // 2:
        out.append(current)
    return [c for c in out if c.strip()]


def build_example(out_dir: str | Path, *, classes: dict[str, list[str]] = CLASSES, min_chars: int = 400,
                  max_chars: int = 800, max_per_class: int = 0, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl; returns the records per split and label.
    ``max_per_class`` (0: all) keeps at most that many training chunks of each class and a quarter
    as many evaluation chunks, drawn with ``seed``."""
    root, rng = python_stdlib_root(), random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for label, packages in classes.items():
        files = sorted((f for package in packages for f in (root / package).rglob("*.py")),
                       key=lambda f: (-f.stat().st_size, f.relative_to(root).as_posix()))
        for split in splits:
            held_out = split == "eval"
            mine = [f for i, f in enumerate(files) if (i % EVAL_EVERY == EVAL_FIRST) == held_out]
            records = [{"text": chunk, "label": label, "source": str(f.relative_to(root))}
                       for f in mine for chunk in chunks(f.read_text(encoding="utf-8"), min_chars, max_chars)]
            limit = max_per_class // (4 if held_out else 1)
            if max_per_class and len(records) > limit:
                records = [records[i] for i in sorted(rng.sample(range(len(records)), limit))]
            splits[split].extend(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, records in splits.items():
        rng.shuffle(records)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        counts[split] = {label: sum(r["label"] == label for r in records) for label in classes}
    return counts


def add(sub) -> None:
    sp = sub.add_parser("finetune-example", help="write train.jsonl and eval.jsonl for --task classify: chunks of "
                                                 "standard-library sources labelled by package (email, asyncio, "
                                                 "multiprocessing), evaluation files unseen in training")
    sp.add_argument("out_dir")
    sp.add_argument("--min-chars", type=int, default=400, help="shortest chunk (whole lines)")
    sp.add_argument("--max-chars", type=int, default=800, help="longest chunk")
    sp.add_argument("--max-per-class", type=int, default=0,
                    help="at most this many training chunks per label, a quarter as many for evaluation (0: all)")
    sp.set_defaults(func=run)


def run(args) -> int:
    counts = build_example(args.out_dir, min_chars=args.min_chars, max_chars=args.max_chars,
                           max_per_class=args.max_per_class)
    out = Path(args.out_dir)
    for split, by_label in counts.items():
        print(f"{out / split}.jsonl: {sum(by_label.values())} records ("
              + ", ".join(f"{label} {n}" for label, n in by_label.items()) + ")")
    print(f"fine-tune: megalm finetune runs/quickstart --task classify --train {out / 'train.jsonl'} "
          f"--eval {out / 'eval.jsonl'}")
    return 0

"""``megalm finetune CKPT --task lm|classify``: a new training run from a checkpoint's weights (a
megalm run's, or a Hugging Face model imported with ``megalm ckpt import``).

Both are ordinary runs of the one Trainer (any layout, torchrun, checkpoints, exact resume) whose
config is the checkpoint's model and training settings (``run_config``) with ``train.init_from`` set
to it: its weights, with a fresh optimizer, LR schedule and data position. The same command run
again resumes the new run from its own newest checkpoint.

- ``--task lm --data DIR``: continued pretraining on a domain corpus prepared with the checkpoint's
  tokenizer. ``--keep-optimizer`` also keeps its Adam moments and step count, so the LR schedule
  goes on from its step (``train.steps`` is then the step to end at). Run dir: runs/RUN-lm-DATA.
- ``--task classify --train F --eval G``: a classifier (``model.labels``: the training file's,
  sorted, unless given) with fine-tuning's defaults (``CLASSIFY_DEFAULTS``: a gentler learning rate,
  lighter weight decay, closer looks); at the end RUN_DIR/eval.json and confusion.png, and the
  scores printed. Run dir: runs/RUN-classify.
"""

import json
import os
import time
from pathlib import Path

# Fine-tuning moves pretrained weights a little, on a small set. Overrides win.
CLASSIFY_DEFAULTS = {"steps": 200, "global_batch": 32, "micro_batch_size": 32, "lr": 5e-4, "min_lr": 5e-5,
                     "warmup_steps": 20, "weight_decay": 0.01, "log_every": 10, "eval_every": 50}


def add(sub) -> None:
    sp = sub.add_parser("finetune", help="adapt a checkpoint: classification (--task classify) or continued "
                                         "pretraining on a domain corpus (--task lm)")
    sp.add_argument("ckpt", help="a run dir (its newest checkpoint), a checkpoint directory, or an imported model")
    sp.add_argument("--task", choices=["classify", "lm"], required=True)
    sp.add_argument("--data", help="lm: a prepared data directory (prepared with the checkpoint's tokenizer)")
    sp.add_argument("--train", help="classify: a .jsonl file of {text, label} records to train on")
    sp.add_argument("--eval", help="classify: a .jsonl file of {text, label} records to score")
    sp.add_argument("--keep-optimizer", action="store_true",
                    help="lm: continue the checkpoint's Adam moments and step count, so the LR schedule goes on from "
                         "its step (train.steps is then the step to end at), instead of fresh ones")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 train.run_dir=runs/ft")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.checkpoint import catalog
    from megalm.train.trainer import train

    t0 = time.time()
    ckpt, _ = catalog.resolve_verified(args.ckpt)  # before the world starts: a damaged one fails in seconds
    if args.task == "lm":
        return train(lm_config(ckpt, args.data, args.keep_optimizer, args.overrides)).report()
    cfg = classify_config(ckpt, args.train, args.eval, args.overrides)
    summary = train(cfg)
    if summary.stopped or summary.steps < cfg.train.steps:  # a signal, or train.stop_at: no final scores yet
        return summary.report()
    if int(os.environ.get("RANK", "0")) == 0:
        print(scores_text(summary.scores["report"], summary.steps, time.time() - t0, args.eval, summary.run_dir))
    return 0


def lm_config(ckpt: Path, data_dir: str | None, keep_optimizer: bool, overrides: list[str]):
    from megalm.checkpoint.store import run_config
    from megalm.errors import UsageError

    if not data_dir:
        raise UsageError("--data: continued pretraining (--task lm) needs a prepared data directory, made with the "
                         "checkpoint's tokenizer (megalm prepare data.tokenizer=CKPT ...)")
    run_dir = Path("runs") / f"{run_name(ckpt)}-lm-{Path(str(data_dir).rstrip('/')).name}"
    return run_config(ckpt, [f"train.run_dir={json.dumps(str(run_dir))}",
                             f"train.init_from={json.dumps(str(ckpt.resolve()))}",
                             f"train.init_keep_optimizer={json.dumps(keep_optimizer)}", *overrides], data_dir)


def classify_config(ckpt: Path, train_file: str | None, eval_file: str | None, overrides: list[str]):
    from megalm.checkpoint.store import run_config
    from megalm.errors import UsageError

    if not train_file or not eval_file:
        raise UsageError("megalm finetune --task classify: give --train FILE.jsonl and --eval FILE.jsonl")
    run_dir = Path("runs") / f"{run_name(ckpt)}-classify"
    train = {**CLASSIFY_DEFAULTS, "task": "classify", "run_dir": str(run_dir), "init_from": str(ckpt.resolve())}
    return run_config(ckpt, [*(f"train.{k}={json.dumps(v)}" for k, v in train.items()),
                             f"classify.train_file={json.dumps(str(train_file))}",
                             f"classify.eval_file={json.dumps(str(eval_file))}", *overrides])


def run_name(ckpt: Path) -> str:
    """The name of the run a checkpoint belongs to (of an imported model: its directory's)."""
    from megalm.checkpoint import catalog

    run_dir = ckpt.parent.parent
    return run_dir.name if ckpt.parent == catalog.checkpoint_root(run_dir) else ckpt.name


def scores_text(scores: dict, steps: int, seconds: float, eval_file: str, run_dir: Path) -> str:
    base = scores["majority_baseline"]
    return (f"classify: {steps} steps in {seconds:.0f}s; scored {scores['examples']} texts of {eval_file}\n"
            f"  accuracy      {scores['accuracy']:.3f}  (majority baseline {base['accuracy']:.3f}: always "
            f"{base['label']!r})\n"
            f"  macro-F1      {scores['macro']['f1']:.3f}  (weighted-F1 {scores['weighted']['f1']:.3f})\n"
            f"  run dir       {run_dir}  (eval.json, confusion.png, metrics.jsonl, loss.png, checkpoints/)\n"
            f"predict: megalm classify {run_dir} --text '...'  or  --input FILE.jsonl")

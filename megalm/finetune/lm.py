"""``megalm finetune CKPT --task lm --data DIR``: continued pretraining of a checkpoint (a megalm
run's, or a Hugging Face model imported with ``megalm ckpt import``) on a domain corpus prepared
with its tokenizer.

It is an ordinary training run (the Trainer: any layout, torchrun, checkpoints, exact resume) whose
config is the checkpoint's (``run_config``: its model and training settings) on ``data.dir=DIR``,
starting from the checkpoint (``train.init_from``): its weights, with a fresh optimizer, LR schedule
and data position. ``--keep-optimizer`` also keeps its Adam moments and step count, so the LR
schedule goes on from its step (``train.steps`` is then the step to end at). The same command run
again resumes the fine-tuning run from its own newest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from megalm.checkpoint import catalog
from megalm.checkpoint.store import run_config
from megalm.config import Config
from megalm.errors import ConfigError
from megalm.train.trainer import train


def main(args) -> int:
    if not args.data:
        raise ConfigError("--data: continued pretraining (--task lm) needs a prepared data directory, made with the "
                          "checkpoint's tokenizer (megalm prepare data.tokenizer=CKPT ...)")
    ckpt, _ = catalog.resolve_verified(args.ckpt)
    return train(finetune_config(ckpt, args.data, args.keep_optimizer, args.overrides)).report()


def finetune_config(ckpt: Path, data_dir: str, keep_optimizer: bool, overrides: list[str]) -> Config:
    """The fine-tuning run's config; its run dir is runs/RUN-lm-DATA (the checkpoint's run, the data
    directory's name) unless ``train.run_dir`` is given."""
    run_dir = Path("runs") / f"{run_name(ckpt)}-lm-{Path(str(data_dir).rstrip('/')).name}"
    return run_config(ckpt, data_dir, [f"train.run_dir={json.dumps(str(run_dir))}",
                                       f"train.init_from={json.dumps(str(ckpt.resolve()))}",
                                       f"train.init_keep_optimizer={json.dumps(keep_optimizer)}", *overrides])


def run_name(ckpt: Path) -> str:
    """The name of the run a checkpoint belongs to (of an imported model: its directory's)."""
    run_dir = ckpt.parent.parent
    return run_dir.name if ckpt.parent == catalog.checkpoint_root(run_dir) else ckpt.name

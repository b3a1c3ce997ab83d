"""What a run learns, by name (``train.task``), as torchtitan registers its model components: the
Trainer is one loop, and a task brings the parts that differ.

A task reads its data in ``__init__`` (collective), tells ``config.resolve`` what the data decides
(``resolve``), and then provides:

- ``tokenizer``: the tokenizer file every checkpoint of the run carries;
- ``loader(batch, mesh)``: the stateful iterator of ``Step``s (megalm.data.loader) the loop trains on;
- ``evaluate(engine, mesh, device)``: collective; the scores, ``val_*`` keys going to metrics.jsonl;
- ``log_fields()``: what a training metrics row adds; ``finish(run_dir, scores)``: rank 0's last
  outputs; ``source_names``: what the rows' ``tokens_by_source`` counts.

The model's head and loss follow from the config (``model.labels``: megalm.model.classifier), so a
task never touches the model.
"""

from __future__ import annotations

from megalm.config import Config
from megalm.parallel.distributed import World
from megalm.train.tasks.classify import Classification
from megalm.train.tasks.lm import LanguageModeling

TASKS = {"lm": LanguageModeling, "classify": Classification}


def build_task(cfg: Config, world: World):
    """The task ``train.task`` names, its data read (collective)."""
    return TASKS[cfg.train.task](cfg, world)

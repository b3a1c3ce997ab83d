"""The text classifier: a pretrained Transformer with a linear head on one pooled hidden state;
loading it from a fine-tuning checkpoint; class log-probabilities of token ids in batches."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megalm.checkpoint import catalog
from megalm.checkpoint.shards import CheckpointReader
from megalm.config import FinetuneConfig, ModelConfig, from_dict
from megalm.errors import CheckpointError
from megalm.finetune.labelled import PAD, trim
from megalm.model.transformer import Transformer, layer_ids
from megalm.parallel.mesh import Mesh
from megalm.parallel.tensor_parallel import TPContext, init_layer, parameter


class Classifier(Transformer):
    """The Transformer's final hidden state at one position, through a linear head to class logits.

    The position is the last real token for a causal model (the only one that has seen the whole
    text) and the first for a masked one (which sees both ways). Parameter names stay the
    Transformer's (``embed.*``, ``blocks.*``, ``norm.*``) plus ``classifier.*``, so a pretraining
    checkpoint loads by name and the checkpointer saves it like any Transformer. There is no LM
    head: a tied embedding serves the input alone, an untied head is left out.
    """

    def __init__(self, cfg: ModelConfig, n_labels: int, mesh: Mesh | None = None, *, seed: int = 0,
                 checkpointing: str = "none"):
        super().__init__(cfg, mesh, seed=seed, checkpointing=checkpointing)
        self.head = None
        self.classifier = ClassifierHead(cfg, n_labels, self.tp, seed)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Class logits (B, n_labels) of right-padded ids (PAD after each text); given labels,
        (loss, logits) with the loss of ``loss_fn`` (its mean, or training's scaled sum; rows
        labelled IGNORE do not count)."""
        padding = input_ids == PAD
        x = self.hidden_states(input_ids.masked_fill(padding, 0), padding)
        if self.cfg.objective == "causal":
            x = x[torch.arange(len(x), device=x.device), (~padding).sum(1) - 1]
        else:
            x = x[:, 0]
        logits = self.classifier(x)
        if labels is None:
            return logits
        return self.loss_fn(logits, labels), logits.detach()

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """The Transformer's weights from a checkpoint's one-process state (a language model's or
        another classifier's); the head keeps its fresh, seeded weights."""
        wanted = [name for name in self.state_dict() if not name.startswith("classifier.")]
        missing = [name for name in wanted if name not in state]
        if missing:
            raise CheckpointError(f"the checkpoint holds no values for {', '.join(missing[:3])}"
                                  f"{' …' if len(missing) > 3 else ''}: not a checkpoint of this model")
        self.load_state_dict({name: state[name] for name in wanted}, strict=False)


class ClassifierHead(nn.Module):
    """Class logits of pooled hidden states; seeded like every layer (after the LM head's id)."""

    def __init__(self, cfg: ModelConfig, n_labels: int, tp: TPContext, seed: int):
        super().__init__()
        self.weight = parameter((n_labels, cfg.d_model), cfg.init_std)
        self.bias = parameter((n_labels,), None)
        init_layer(self, len(layer_ids(cfg)), seed, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, FinetuneConfig, Path]:
    """The classifier of a fine-tuning run dir's newest checkpoint (or of one checkpoint dir), in
    eval mode, with the run's fine-tuning settings (labels, max_len)."""
    ckpt, meta = catalog.resolve_verified(path)
    finetune = from_dict(FinetuneConfig, meta.config.get("finetune", {}), "finetune")
    if finetune.task != "classify":
        raise CheckpointError(f"{ckpt}: not a classifier; fine-tune one with "
                              f"megalm finetune CKPT --task classify --train FILE --eval FILE")
    model = Classifier(from_dict(ModelConfig, meta.config["model"], "model"), len(finetune.labels))
    model.load_state_dict(CheckpointReader(ckpt, meta).model_state())
    return model.to(device).eval(), finetune, ckpt


@torch.no_grad()
def class_log_probs(model, ids: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Log-probabilities (N, n_labels) of each row of ``ids``, ``batch_size`` rows per forward pass
    of ``model`` (a Classifier or its DeepSpeed engine)."""
    out = [F.log_softmax(model(trim(chunk).to(device)).float(), dim=-1).cpu() for chunk in ids.split(batch_size)]
    return torch.cat(out)

"""The Transformer as a list of layers: Embedding, Block x n_layers, FinalNorm, and a head: the
language-model head (``Head``; with tied embeddings the embedding matrix itself,
``Embedding.logits``) or, for a model with ``model.labels``, the classifier head
(``model/classifier.py``). Each head comes with its loss function.

``Transformer`` runs the whole list (tensor and data parallel, any ZeRO stage); a pipeline cuts the
same layers into chunks (``pipeline.py``). ``layer_ids`` numbers the layers once for everything that
needs it: layer ``i`` is initialized from seeds that depend only on ``i`` and the parameter's name,
so every form, on any layout, starts from the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from megalm.config import ModelConfig
from megalm.common import PAD
from megalm.model.classifier import ClassifierHead, PooledCrossEntropy
from megalm.model.layers import Block, Embedding, FinalNorm, Head, LossFunction
from megalm.parallel.mesh import Mesh, single_process_mesh
from megalm.parallel.tensor_parallel import TPContext, gather_vocab


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, *, seed: int = 0,
                 sequence_parallel: bool = False, checkpointing: str = "none"):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.max_seq_len <= 0:
            raise ValueError("model.vocab_size and model.max_seq_len must be resolved before building the model")
        self.cfg = cfg
        self.tp = TPContext(mesh or single_process_mesh(), sequence_parallel)
        ids = layer_ids(cfg)
        self.embed = Embedding(cfg, self.tp, ids["embed"], seed)
        self.blocks = nn.ModuleList(Block(cfg, self.tp, ids[f"blocks.{i}"], seed, checkpointing)
                                    for i in range(cfg.n_layers))
        self.norm = FinalNorm(cfg, self.tp, ids["norm"], seed)
        self.head = None if cfg.tie_embeddings or cfg.labels else Head(cfg, self.tp, ids["head"], seed)
        self.classifier = ClassifierHead(cfg, self.tp, ids["classifier"], seed) if cfg.labels else None
        self.loss_fn = PooledCrossEntropy() if cfg.labels else LossFunction(self.tp)

    def forward(self, input_ids: torch.Tensor, target=None) -> torch.Tensor:
        """The loss given a target (see the loss functions); otherwise the logits: the full
        vocabulary's (gathered over tensor ranks), or a classifier's class logits of every position."""
        # Right padding (a classifier's texts) changes nothing a causal model reads; a bidirectional
        # one must not attend to it
        padding = input_ids == PAD if self.classifier is not None and self.cfg.objective == "masked" else None
        x = self.hidden_states(input_ids, padding)
        if self.classifier is not None:
            logits = self.classifier(x)
        else:
            logits = self.embed.logits(x) if self.head is None else self.head(x)
        if target is None:
            return logits if self.classifier is not None else gather_vocab(logits, self.tp)
        return self.loss_fn(logits, target)

    def hidden_states(self, input_ids: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, d_model), what the heads read (with sequence
        parallelism, this rank's slice of the sequence). ``padding`` (B, T) marks right padding,
        which bidirectional (masked-LM) attention must not attend to."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x)


def layer_ids(cfg: ModelConfig) -> dict[str, int]:
    """The model's layers in order, by their name in ``Transformer``: embed, blocks.0 … blocks.N-1,
    norm, and head (a language model) or classifier (a model with labels). The id is the layer's
    position (a pipeline's layer index)."""
    names = ["embed", *(f"blocks.{i}" for i in range(cfg.n_layers)), "norm", "classifier" if cfg.labels else "head"]
    return {name: i for i, name in enumerate(names)}


def one_process_names(module: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter of a ``Transformer`` or of this rank's pipeline chunks, with its name in the
    one-process ``Transformer``: a chunk's parameters carry it after ``chunks.K.``, and a tied
    head's copy of the embedding matrix (``tied.weight``) is ``embed.tok.weight``."""
    out = {}
    for name, p in module.named_parameters():
        if name.startswith("chunks."):
            name = name.split(".", 2)[2]
        out[p] = "embed.tok.weight" if name == "tied.weight" else name
    return out


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the whole model, whatever the layout."""
    d, q, kv, ffn = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
    bias = cfg.style == "gpt2"
    norm = d * (2 if bias else 1)
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if bias else 0)
    mlp = d * ffn * (2 if cfg.style == "llama" else 1) + ffn * d + (ffn + d if bias else 0)
    n = cfg.n_layers * (attn + mlp + 2 * norm) + norm
    n += cfg.vocab_size * d * (1 if cfg.tie_embeddings or cfg.labels else 2)  # a classifier has no LM head
    n += len(cfg.labels) * (d + 1)
    return n + (cfg.max_seq_len * d if cfg.style == "gpt2" else 0)

"""The Transformer cut into pipeline chunks, and which rank of a pipeline holds which.

The model's layers (``transformer.layer_ids``: embed, blocks, norm, head) are split into ``pp * v``
chunks of consecutive layers, balanced by parameters or by layer count (``parallel.pp_partition``);
each chunk is one stage of ``torch.distributed.pipelining``. Where a chunk runs depends on the
schedule (``parallel.pp_schedule``):

- ``1f1b``: one chunk per rank (v = 1), chunk i on rank i.
- ``interleaved``: v chunks per rank, chunk i on rank i mod pp (Narayanan et al. 2021): a smaller
  bubble, (pp - 1) / (v m + pp - 1) of the step, for v times the pipeline messages.
- ``zb``: the loop placement of ``interleaved``, scheduled zero-bubble style (backward split into
  its input- and weight-gradient halves; v = 1 allowed).
- ``zbv``: two chunks per rank in a V (Qi et al. 2024): rank r holds chunks r and 2 pp - 1 - r, so
  the embedding and the output head share rank 0.

A chunk's parameters carry the one-process ``Transformer``'s names (``embed.tok.weight``,
``blocks.3.attn.qkv.weight``…) under ``chunks.K.``, and each layer is seeded by its layer id, so
every placement starts from the one-process weights and checkpoints stay layout-free. With tied
embeddings the head reuses the embedding matrix; on a rank that does not hold the embedding the head
keeps a copy (``TiedHead``, marked ``pipeline_copy``) whose gradient the trainer adds to the
original's after each backward (train/pipeline.py), so both take the same update.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from megalm.config import Config, ModelConfig, virtual_stages
from megalm.model.classifier import ClassifierHead, PooledCrossEntropy
from megalm.model.layers import Block, Embedding, FinalNorm, Head, LossFunction
from megalm.model.transformer import layer_ids
from megalm.parallel.mesh import Mesh
from megalm.parallel.tensor_parallel import TPContext

def chunk_ranks(schedule: str, pp: int, v: int) -> list[int]:
    """The pipeline rank that holds each chunk."""
    if schedule == "zbv":
        return [i if i < pp else 2 * pp - 1 - i for i in range(2 * pp)]
    return [i % pp for i in range(pp * v)]


def layer_parameters(m: ModelConfig, tp: int, pipeline: bool) -> list[int]:
    """Parameters per tensor-parallel rank of each layer: embed, the blocks, final norm, head.

    Weight matrices are split over tp ranks (the vocabulary of the embedding and head, q/k/v and the
    MLP's up projection by output, the output projections by input); norms, the position embedding,
    the biases of the row-parallel output projections and key/value heads fewer than tp ranks are
    whole on every rank. A pipeline's head holds a copy of a tied embedding where the embedding is on
    another rank (``TiedHead``; its matmul costs what an untied head's does); one process has none.
    """
    d, hd, ff, bias = m.d_model, m.head_dim, m.ffn_dim, m.style == "gpt2"
    norm = d * (2 if bias else 1)
    q, kv = m.n_heads * hd, 2 * m.kv_heads * hd
    split_kv = m.kv_heads % tp == 0
    attn = (d * q + (q if bias else 0)) / tp + (d * kv + (kv if bias else 0)) / (tp if split_kv else 1)
    attn += q * d / tp + (d if bias else 0)
    up = ff * (2 if m.style == "llama" else 1)
    mlp = (d * up + (up if bias else 0)) / tp + ff * d / tp + (d if bias else 0)
    block = int(attn + mlp + 2 * norm)
    embed = m.vocab_size * d // tp + (m.max_seq_len * d if m.style == "gpt2" else 0)
    head = (embed if pipeline else 0) if m.tie_embeddings else m.vocab_size * d // tp
    return [embed, *[block] * m.n_layers, norm, head]


@functools.cache
def partition(weights: tuple[int, ...], parts: int, method: str) -> list[int]:
    """Boundaries b (len parts + 1) of ``parts`` non-empty runs of consecutive layers: by
    ``parameters``, the split whose heaviest run is lightest; ``uniform``, equal layer counts (the
    first runs one longer where they do not divide)."""
    n = len(weights)
    if parts > n:
        raise ValueError(f"{parts} pipeline chunks need at least {parts} layers; the model has {n}")
    if method == "uniform":
        return [i * n // parts for i in range(parts + 1)]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[k][i]: the lightest heaviest run splitting the first i layers into k runs
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                heaviest = max(best[k - 1][j], prefix[i] - prefix[j])
                if heaviest < best[k][i]:
                    best[k][i], cut[k][i] = heaviest, j
    bounds, i = [n], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def chunk_layers(cfg: Config, pp: int) -> list[list[str]]:
    """The layer names of each chunk, in order."""
    names = list(layer_ids(cfg.model))
    counts = layer_parameters(cfg.model, 1, pipeline=True)
    bounds = partition(tuple(counts), pp * virtual_stages(cfg.parallel), cfg.parallel.pp_partition)
    return [names[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]


class TiedHead(nn.Module):
    """The output head of tied embeddings: logits against the embedding matrix. Given the rank's
    ``Embedding`` it holds that one's matrix (a parameter of both chunks, so a zero-bubble
    schedule's weight-gradient pass of either chunk reaches it); otherwise a copy, seeded as the
    embedding's (so equal to it), marked for the gradient exchange, the norm and the checkpoint."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, layer_id: int, seed: int, embedding: Embedding | None):
        super().__init__()
        self.tp = tp
        if embedding is not None:
            self.weight = embedding.tok.weight
        else:
            self.weight = Embedding(cfg, tp, layer_id, seed).tok.weight
            self.weight.pipeline_copy = True
            self.weight.ds_pipe_replicated = True  # DeepSpeed's gradient norm counts the original only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.column_parallel(x, (self.weight, None))[0]


class PipelineChunk(nn.Module):
    """Consecutive layers of the model, under their one-process names."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, names: list[str], ids: dict[str, int], seed: int,
                 checkpointing: str, embedding: Embedding | None = None):
        super().__init__()
        self.tp = tp
        self.embed = Embedding(cfg, tp, ids["embed"], seed) if "embed" in names else None
        self.blocks = nn.ModuleDict({name.split(".")[1]: Block(cfg, tp, ids[name], seed, checkpointing)
                                     for name in names if name.startswith("blocks.")})
        self.norm = FinalNorm(cfg, tp, ids["norm"], seed) if "norm" in names else None
        self.head = self.classifier = self.tied = None
        if "classifier" in names:
            self.classifier = ClassifierHead(cfg, tp, ids["classifier"], seed)
        elif "head" in names and cfg.tie_embeddings:
            self.tied = TiedHead(cfg, tp, ids["embed"], seed, self.embed or embedding)
        elif "head" in names:
            self.head = Head(cfg, tp, ids["head"], seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) if self.embed is not None else self.tp.join_message(x)
        for block in self.blocks.values():
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        heads = [head for head in (self.head, self.classifier, self.tied) if head is not None]
        return heads[0](x) if heads else self.tp.split_message(x)


class PipelineModel(nn.Module):
    """This rank's chunks of a pipeline (``chunks[k]`` is chunk ``indices[k]`` of ``n_chunks``),
    with the model's loss function, which the last chunk's rank applies."""

    def __init__(self, cfg: Config, mesh: Mesh, *, seed: int):
        super().__init__()
        m, p = cfg.model, cfg.parallel
        tp = TPContext(mesh, p.sequence_parallel)
        layers = chunk_layers(cfg, mesh.pp)
        owner = chunk_ranks(p.pp_schedule, mesh.pp, virtual_stages(p))
        self.schedule, self.n_chunks = p.pp_schedule, len(layers)
        self.indices = [i for i, rank in enumerate(owner) if rank == mesh.pp_rank]  # this rank's chunks
        self.owners = owner  # the pipeline rank of each chunk: the last one's computes the loss
        chunks, ids = {}, layer_ids(m)
        for i in sorted(self.indices):  # the embedding's chunk first: a tied head on the same rank reads it
            embedding = chunks[0].embed if 0 in chunks else None
            chunks[i] = PipelineChunk(m, tp, layers[i], ids, seed, p.activation_checkpointing, embedding)
        self.chunks = nn.ModuleList(chunks[i] for i in self.indices)
        self.loss_fn = PooledCrossEntropy() if m.labels else LossFunction(tp)

    def tied_copies(self) -> list[nn.Parameter]:
        """Copies of the embedding matrix held here for a tied head (the gradient exchange's)."""
        return [p for p in self.parameters() if getattr(p, "pipeline_copy", False)]

    @property
    def last_rank(self) -> int:
        return self.owners[-1]

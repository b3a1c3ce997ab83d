"""Activations kept for backward per Transformer layer, measured, against Megatron-LM's figures.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count the
bytes a GPT layer keeps for backward at 2 bytes an element: s·b·h·(34 + 5as/h) on one process,
s·b·h·(10 + 24/t + 5as/(ht)) with tensor parallelism t, s·b·h·(34 + 5as/h)/t with sequence
parallelism (SP) too, and 2·s·b·h with full recomputation. The 5as/h terms are the s x s attention
scores, which flash attention never keeps; the rest, in elements of s·b·h (fp32 here: 4 bytes each):

GPT-2 block (LayerNorm, GELU MLP of width 4h, dropout 0, our default: no dropout masks kept):
    between regions (divided by t with SP only): the two norms' inputs 2, the q/k/v and MLP-up
    linears' input (the norms' outputs) 2;
    inside the regions (divided by t): q, k, v 3, the attention output (the output projection's
    input) 1, the GELU's input 4 and the down projection's input 4;
    so 4 + 12/t, and 16/t with SP: Megatron's 34 bytes less the two 1-byte dropout masks, at 2 bytes.
Llama block (RMSNorm, rotary q and k, SwiGLU MLP of width f, no dropout), as Megatron keeps it with
its fused SwiGLU (input only, silu recomputed):
    between regions: 4 as above, plus 2 on CPU only: torch's RMSNorm there is a composite that also
    keeps its normalized output (the fused CUDA, Triton and Apex norms keep the input and 1/rms);
    inside the regions: rotated q and k, and v 3, the attention output 1, the SwiGLU's input (gate
    and value) 2f/h, the down projection's input f/h: 4 + 3f/h.
Selective recomputation (of the attention core) keeps the same: with flash attention it keeps no
s x s scores in the first place. Full recomputation keeps the layer's input, 1 (1/t with SP). The
output head keeps its input, 1 (1/t with SP). Per-row fp32 statistics (the norms' mean and 1/std,
attention's log-sum-exp per head) are not in the formulas: here they add at most 1.2% to a layer.

Each layout runs in one gloo launch per tp (2 and 4) that also checks the loss and every gradient
against one process.
"""

import collections
import itertools
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from megalm.config import ModelConfig
from megalm.model.layers import MLP
from megalm.model.transformer import Transformer
from megalm.parallel.mesh import build_mesh, single_process_mesh
from megalm.parallel.tensor_parallel import TPContext, init_layer

S, B, H = 64, 2, 64
STYLES = {
    "gpt2": ModelConfig(style="gpt2", n_layers=2, d_model=H, n_heads=4, vocab_size=128, max_seq_len=S),
    "llama": ModelConfig(style="llama", n_layers=2, d_model=H, n_heads=4, vocab_size=128, max_seq_len=S,
                         tie_embeddings=False),  # the untied head: ColumnParallelLinear
}
VARIANTS = {  # name: (sequence parallel, activation checkpointing)
    "TP": (False, "none"),
    "TP+SP": (True, "none"),
    "TP+SP, selective recompute": (True, "selective"),
    "TP, full recompute": (False, "full"),
    "TP+SP, full recompute": (True, "full"),
}
TOLERANCE = 0.03


def expected(cfg: ModelConfig, tp: int, sp: bool, checkpointing: str) -> tuple[float, float]:
    """Elements kept per layer and by the head, in units of s·b·h (the module docstring's count)."""
    if checkpointing == "full":
        replicated, parallel = 1, 0
    elif cfg.style == "gpt2":
        replicated, parallel = 4, 12
    else:
        replicated, parallel = 4 + 2, 4 + 3 * cfg.ffn_dim / cfg.d_model
    per_layer = (replicated + parallel) / tp if sp else replicated + parallel / tp
    return per_layer, 1 / tp if sp else 1


def kept_for_backward(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss, and the bytes kept for backward in each part of the model: distinct storages,
    parameters and buffers left out, each counted in the part that kept it first."""
    owned = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    kept, part = {}, ["embedding"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in owned:
            kept.setdefault(t.untyped_storage().data_ptr(), (part[0], t))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        x = model.embed(ids)
        for i, block in enumerate(model.blocks):
            part[0] = f"layer {i}"
            x = block(x)
        part[0] = "norm"
        x = model.norm(x)
        part[0] = "head"
        logits = model.embed.logits(x) if model.head is None else model.head(x)
        part[0] = "loss"
        loss = model.loss_fn(logits, labels)
    nbytes = collections.Counter()
    for where, t in kept.values():
        nbytes[where] += t.untyped_storage().nbytes()
    return loss, nbytes


def _rank(rank: int, tp: int, tmp: str) -> None:
    """One tensor-parallel rank: every style and variant, measured and checked against one process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=tp)
    mesh = build_mesh(tp, 1, tp, rank)
    ids, labels = torch.randint(0, 128, (2, B, S), generator=torch.Generator().manual_seed(0))
    results = {}
    for style, cfg in STYLES.items():
        reference = Transformer(cfg)
        reference_loss = reference(ids, labels)
        reference_loss.backward()
        grads = {name: p.grad for name, p in reference.named_parameters()}
        scale = max(g.abs().max().item() for g in grads.values())
        for variant, (sp, checkpointing) in VARIANTS.items():
            model = Transformer(cfg, mesh, sequence_parallel=sp, checkpointing=checkpointing)
            loss, nbytes = kept_for_backward(model, ids, labels)
            loss.backward()
            worst = max((p.grad - (p.shard.take(grads[name], rank, tp) if hasattr(p, "shard") else grads[name]))
                        .abs().max().item() for name, p in model.named_parameters())
            results[f"{style}, {variant}"] = {
                "layers": [nbytes[f"layer {i}"] / (S * B * H * 4) for i in range(cfg.n_layers)],
                "head": nbytes["head"] / (S * B * H * 4), "expected": expected(cfg, tp, sp, checkpointing),
                "loss": abs(loss.item() - reference_loss.item()) / reference_loss.item(), "grad": worst / scale}
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 4])
def test_each_layer_keeps_what_megatron_keeps(tp, tmp_path):
    torch.multiprocessing.spawn(_rank, args=(tp, str(tmp_path)), nprocs=tp)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(tp)]
    rows = []
    for name, got in ranks[0].items():
        per_layer, head = got["expected"]
        rows.append(f"| tp={tp} {name} | {' / '.join(f'{x:.3f}' for x in got['layers'])} | {per_layer:.3f} | "
                    f"{got['head']:.3f} | {head:.3f} |")
        for layer in got["layers"]:
            assert layer == pytest.approx(per_layer, rel=TOLERANCE), f"{name}: a layer keeps {layer} s·b·h elements"
        assert got["head"] == pytest.approx(head, rel=TOLERANCE), f"{name}: the head keeps {got['head']} s·b·h"
        assert all(r[name]["layers"] == got["layers"] for r in ranks), f"{name}: ranks keep different amounts"
        for r, result in enumerate(ranks):
            assert result[name]["loss"] < 1e-5 and result[name]["grad"] < 1e-5, f"{name}, rank {r}: {result[name]}"
    print("\n| layout | kept per layer (s·b·h fp32 elements) | formula | head | formula |\n|---|---|---|---|---|\n"
          + "\n".join(rows))


def test_swiglu_gradients_are_autograds():
    """The llama MLP's SwiGLU recomputes silu in backward: its gradients are those autograd derives."""
    cfg, tp = STYLES["llama"], TPContext(single_process_mesh())
    mlp = MLP(cfg, tp)
    init_layer(mlp, 0, 0, tp)
    mlp.double()
    x = torch.randn(B, S, H, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, S, H, dtype=torch.float64)
    mlp(x).backward(grad)
    gate, value = F.linear(x, mlp.up.weight).chunk(2, dim=-1)
    expected = torch.autograd.grad(F.linear(F.silu(gate) * value, mlp.down.weight), (x, mlp.up.weight, mlp.down.weight),
                                   grad)
    for got, want in zip((x.grad, mlp.up.weight.grad, mlp.down.weight.grad), expected):
        torch.testing.assert_close(got, want)

"""Context parallelism (parallel.cp): each sequence split over cp ranks, attention by all-to-all over
heads. The model's loss and gradients equal one process's on every layout and objective; what a
layer keeps for backward falls to 1/cp; and through megalm train, a cp run trains the one-process
curve and its checkpoint resumes at another cp."""

import pytest
import torch
import torch.distributed as dist

from megalm.config import ModelConfig
from megalm.model.transformer import Transformer
from megalm.parallel.context_parallel import sequence_part
from megalm.parallel.mesh import build_mesh
from megalm.plan.memory import saved_per_layer
from tests.test_activation_memory import kept_for_backward
from tests.helpers import CONFIG, TINY, compare_parameters, metrics, run_megalm, torchrun, train_losses

S, B, H = 4096, 1, 64
MODELS = {  # learned positions and a causal mask; RoPE, grouped-query heads and bidirectional attention
    "gpt2 causal": ModelConfig(style="gpt2", n_layers=2, d_model=H, n_heads=4, vocab_size=128, max_seq_len=S),
    "llama masked": ModelConfig(style="llama", n_layers=2, d_model=H, n_heads=4, n_kv_heads=2, vocab_size=128,
                                max_seq_len=S, objective="masked", tie_embeddings=False),
}
LAYOUTS = {  # name: (tp, cp, sequence parallel), on 4 processes (dp fills the rest)
    "cp=2": (1, 2, False), "cp=4": (1, 4, False), "tp=2 x cp=2, SP": (2, 2, True),
}


def _rank(rank: int, tmp: str, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=4)
    generator = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 128, (2, B, S), generator=generator)
    labels[:, ::3] = -100  # (labels that do not count, as masked LM has most of)
    for model_name, cfg in MODELS.items():
        reference = Transformer(cfg)
        expected, kept = kept_for_backward(reference, ids, (labels, 1.0))
        expected.backward()
        grads = {name: p.grad for name, p in reference.named_parameters()}
        scale = max(g.abs().max().item() for g in grads.values())
        for layout, (tp, cp, sp) in LAYOUTS.items():
            mesh = build_mesh(tp, 1, 4, rank, cp)
            model = Transformer(cfg, mesh, sequence_parallel=sp)
            loss, nbytes = kept_for_backward(model, sequence_part(ids, mesh), (sequence_part(labels, mesh), 1.0))
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total, group=mesh.cp_group)  # (each cp rank's loss sums its part's labels)
            worst = 0.0
            for name, p in model.named_parameters():
                dist.all_reduce(p.grad, group=mesh.cp_group)  # what the data-parallel reduction adds
                want = p.shard.take(grads[name], mesh.tp_rank, tp) if hasattr(p, "shard") else grads[name]
                worst = max(worst, (p.grad - want).abs().max().item() / scale)
            out.put((model_name, layout, rank, abs(total.item() - expected.item()) / expected.item(), worst,
                     [(nbytes[f"layer {i}"], kept[f"layer {i}"]) for i in range(cfg.n_layers)]))
    dist.destroy_process_group()


def repeated_key_value_bytes(cfg: ModelConfig, tp: int, cp: int) -> float:
    """What a layer keeps beyond 1/cp when a rank's key/value heads are fewer than cp: each cp rank
    then holds one whole key and value head over the whole sequence (fp32), not 1/cp of them."""
    local_kv = max(cfg.kv_heads // tp, 1)
    if local_kv >= cp:
        return 0.0
    return 2 * B * S * cfg.head_dim * 4 * (1 - local_kv / cp)


def test_context_parallel_equals_one_process_and_keeps_a_cpth_of_the_activations(tmp_path):
    """gpt2 (learned positions, causal) and llama (RoPE, grouped-query heads, masked LM's bidirectional
    attention), each at cp=2, cp=4 and tp=2 x cp=2 with SP: the loss and every gradient (summed over
    the cp ranks, as the data-parallel reduction sums them) equal one process's to 1e-5, and each
    layer keeps 1/cp of what it keeps on one process (x 1/tp with SP), within 5%, plus the repeated
    key/value heads where a rank has fewer of them than cp (llama here: 2 key/value heads at cp=4);
    megalm plan's estimate of it within 5% too."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, str(tmp_path), out)) for rank in range(4)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=300) for _ in range(4 * len(MODELS) * len(LAYOUTS))]
    for p in procs:
        p.join(30)
    table = {}
    for model_name, layout, rank, loss, grad, kept in rows:
        tp, cp, sp = LAYOUTS[layout]
        assert loss < 1e-5 and grad < 1e-5, (model_name, layout, rank, loss, grad)
        shares = [mine / one for mine, one in kept]
        planned = sum(saved_per_layer(MODELS[model_name], B * S, tp, sp, "none", "fp32", "cpu", cp).values())
        for mine, one in kept:
            expected = one / (cp * (tp if sp else 1)) + repeated_key_value_bytes(MODELS[model_name], tp, cp)
            assert mine == pytest.approx(expected, rel=0.05), (model_name, layout, rank, shares)
            assert mine == pytest.approx(planned, rel=0.05), (model_name, layout, "megalm plan's", planned)
        table[model_name, "cp=1"] = (0.0, [1.0] * len(kept), [one for _, one in kept])
        table[model_name, layout] = (max(loss, table.get((model_name, layout), (0,))[0]), shares,
                                     [mine for mine, _ in kept])
    print(f"\n| model | layout | worst loss difference | kept per layer (MiB, seq {S}) | share of one process's |\n"
          "|---|---|---|---|---|\n" + "\n".join(
              f"| {m} | {lay} | {loss:.1e} | {' / '.join(f'{b / 2**20:.2f}' for b in mib)} | "
              f"{' / '.join(f'{k:.3f}' for k in kept)} |" for (m, lay), (loss, kept, mib) in table.items()))


STEPS = ["train.steps=6", "train.eval_every=3", "train.save_every=3", "data.seq_len=32"]


@pytest.mark.slow
def test_cp_trains_the_one_process_curve_and_resumes_at_another_cp(data_args, single_run, tmp_path):
    """cp=2 (ZeRO 3, full recompute) for 3 steps, resumed at cp=1 for 3 more; and cp=2 x pp=2 (ZeRO 1):
    losses, evaluations and final weights equal one process's (the reference run) to 1e-5."""
    args = ["train", CONFIG, *TINY, *data_args, *STEPS]
    run_dir = tmp_path / "cp"
    first = torchrun(2, *args, f"train.run_dir={run_dir}", "parallel.cp=2", "train.stop_at=3", "train.zero_stage=3",
                     "parallel.activation_checkpointing=full").stderr
    assert "layout: tp=1 x cp=2 x dp=1 x pp=1" in first, first[-2000:]
    run_megalm(*args, f"train.run_dir={run_dir}")
    pipeline = tmp_path / "cp-pp"
    torchrun(4, *args, f"train.run_dir={pipeline}", "parallel.cp=2", "parallel.pp=2", "train.zero_stage=1",
             "train.micro_batch_size=2")
    reference = train_losses(single_run)
    for run in (run_dir, pipeline):
        losses = train_losses(run)
        assert len(losses) == 6 and max(abs(a - b) / b for a, b in zip(losses, reference)) < 1e-5, (run, losses)
        evals = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
        assert evals == pytest.approx([r["val_loss"] for r in metrics(single_run) if "val_loss" in r], rel=1e-5)
        relative, _ = compare_parameters(run, single_run)
        assert relative < 1e-5, (run, relative)

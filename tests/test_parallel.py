"""3D parallelism on CPU over gloo: every layout reproduces one process (fp32).

Each layout trains the same 6 steps on the same global batch from the same seed as the
one-process reference. The first 5 losses must agree to relative 1e-5, and the parameters after
training (consolidated from the layout's sharded checkpoint) to relative 1e-5 in norm, with no
single weight off by more than 1e-4 (a sharding mistake moves weights by ~lr = 3e-3 per step).
Single weights cannot be held to 1e-5: the key bias has an exactly-zero gradient (softmax ignores
a constant added to every score), so Adam turns rounding noise there into steps of ~1e-6..1e-5.
"""

import time

import pytest

from megalm.config import load_config, validate
from megalm.errors import ConfigError
from tests.helpers import CONFIG, REPO, TINY, compare_parameters, metrics, run_megalm, torchrun, train_losses

STEPS = ["train.steps=6", "train.eval_every=3"]
LLAMA_MQA = ["model=llama-tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=1"]

# (tp=2 alone, with and without SP, is also checked layer by layer against one process in
# tests/test_activation_memory.py; here every layout goes through megalm train and DeepSpeed)
LAYOUTS = {  # name: (processes, overrides, reference)
    "pp=2 (ZeRO 1), zero-bubble schedule": (2, ["parallel.pp=2", "train.zero_stage=1", "train.micro_batch_size=2",
                                               "parallel.pp_schedule=zb"], "gpt2"),
    "tp=2 x dp=2 (ZeRO 3)": (4, ["parallel.tp=2", "train.zero_stage=3", "train.micro_batch_size=2"], "gpt2"),
    # (without SP each tensor rank sends 1/2 of a stage's output, the next stage gathers it; tp x pp with SP:
    # tests/test_masked.py)
    "tp=2 x pp=2, full recompute, 2 micro-batches": (
        4, ["parallel.tp=2", "parallel.pp=2", "train.zero_stage=1", "parallel.activation_checkpointing=full",
            "train.micro_batch_size=2"], "gpt2"),
    "llama MQA (1 kv head) tp=2, SP, selective recompute": (
        2, [*LLAMA_MQA, "parallel.tp=2", "parallel.sequence_parallel=true",
            "parallel.activation_checkpointing=selective"], "llama"),
}


@pytest.fixture(scope="module")
def llama_single(data_args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("llama") / "run"
    run_megalm("train", CONFIG, *TINY, *LLAMA_MQA, *STEPS, *data_args, f"train.run_dir={run_dir}")
    return run_dir


@pytest.mark.slow
def test_every_layout_matches_one_process(data_args, single_run, llama_single, tmp_path):
    references = {"gpt2": single_run, "llama": llama_single}
    step_ms = {k: 1000 * sorted(r["step_time_s"] for r in metrics(d) if "step_time_s" in r)[2]
               for k, d in references.items()}
    rows = [f"| one process, {k} (reference) | 1 | - | - | {ms:.0f} ms | - |" for k, ms in step_ms.items()]
    for i, (name, (nproc, overrides, ref_name)) in enumerate(LAYOUTS.items()):
        run_dir = tmp_path / f"layout{i}"
        extra = LLAMA_MQA if ref_name == "llama" and LLAMA_MQA[0] not in overrides else []
        t0 = time.time()
        torchrun(nproc, "train", CONFIG, *TINY, *STEPS, *extra, *overrides, *data_args,
                 f"train.run_dir={run_dir}")
        wall = time.time() - t0
        reference = references[ref_name]
        losses, expected = train_losses(run_dir)[:5], train_losses(reference)[:5]
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
        param_rel, param_worst = compare_parameters(run_dir, reference)
        step_s = sorted(r["step_time_s"] for r in metrics(run_dir) if "step_time_s" in r)[2]  # median of 6
        rows.append(f"| {name} | {nproc} | {loss_rel:.1e} | {param_rel:.1e} (max {param_worst:.1e}) | "
                    f"{1000 * step_s:.0f} ms | {wall:.0f} s |")
        assert loss_rel < 1e-5, f"{name}: losses {losses} vs {expected}"
        val, val_expected = (metrics(d)[-1]["val_loss"] for d in (run_dir, reference))
        assert val == pytest.approx(val_expected, rel=1e-5), f"{name}: validation loss"
        assert param_rel < 1e-5 and param_worst < 1e-4, f"{name}: parameters differ ({param_rel}, {param_worst})"
    print("\n| layout | processes | max loss rel. diff | weights rel. diff | time/step | run |\n"
          "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2"], 3, "tp=2 x pp=1 does not divide the 3 processes"),
    (["parallel.tp=4", "model.n_heads=6"], 4, "model.n_heads=6 is not divisible by tp=4"),
    (["model=llama-tiny", "model.n_heads=6", "model.n_kv_heads=3", "parallel.tp=2"], 2,
     "model.n_kv_heads=3 must divide or be divisible by tp=2"),
    (["parallel.tp=3", "model.n_heads=6"], 3, "parallel.tp: 3 must divide 128"),
    (["parallel.pp=8"], 8, r"8 ranks x 1 chunks need at least 8 layers; the model has 7 \(model.n_layers=4,"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=4"], 2,
     "8 layers; the model has 7"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.virtual_stages=3"], 2,
     "parallel.virtual_stages: the zbv schedule runs 2 chunks per rank; got 3"),
    (["parallel.pp=2", "train.zero_stage=3"], 2, "ZeRO stage 3 cannot be combined with parallel.pp=2"),
    (["parallel.pp=2", "train.precision=bf16"], 2, "with parallel.pp=2, bf16 uses ZeRO stage 1"),
    (["parallel.pp=2", "train.global_batch=8", "train.micro_batch_size=8"], 2,
     "a pipeline of 2 ranks needs at least 2 micro-batches a step; train.global_batch=8 over dp=1 makes 1 of 8; "
     "use train.micro_batch_size=4 or less"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=129"], 2, "data.seq_len=129 is not divisible"),
])
def test_layout_errors_are_config_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(REPO / CONFIG, overrides), world_size=world)


def test_mesh_layout_is_deepspeeds_and_tensor_ranks_are_contiguous():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megalm.parallel.mesh import Mesh

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    for rank in range(12):
        mesh = Mesh(tp=2, pp=2, dp=3, rank=rank)
        coord = topo.get_coord(rank)
        assert (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank) == (coord.pipe, coord.data, coord.model)
        assert mesh.global_rank(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank) == rank
    assert [Mesh(tp=2, pp=2, dp=3, rank=r).tp_rank for r in (0, 1)] == [0, 1]  # a TP pair is adjacent

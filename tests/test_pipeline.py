"""Pipeline schedules (torch.distributed.pipelining under megalm): every schedule trains the
one-process curve and computes its gradients at pp=2 and pp=4, a checkpoint resumes under another
schedule and pipeline size, each schedule's idle time, with chunks made to take a fixed time, is what
its theory says, and a stage holds only what its schedule still needs."""

import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import CONFIG, TINY, compare_parameters, metrics, run_megalm, torchrun, train_losses

# 9 layers (embedding, 6 blocks, final norm, tied head): enough for 4 ranks x 2 chunks; 4 micro-batches
# of 1 a step; clipping at 0.5 acts on the first steps (their gradient norms are above it)
MODEL = ["model.n_layers=6", "train.micro_batch_size=1", "train.grad_clip=0.5", "train.steps=6", "train.eval_every=3",
         "train.save_every=3"]


@pytest.mark.slow
def test_every_schedule_trains_the_one_process_curve_and_resumes_under_another(data_args, tmp_path):
    """One process; interleaved 1F1B at pp=4 with 2 chunks a rank (8 chunks) for 3 steps, resumed
    from its checkpoint as zbv at pp=2 (two chunks a rank in a V: the embedding and its tied head on
    rank 0): losses, evaluations and final weights equal to 1e-5. (1f1b and zb at pp=2:
    tests/test_parallel.py.)"""
    args = ["train", CONFIG, *TINY, *data_args, *MODEL]
    single, mixed = tmp_path / "single", tmp_path / "mixed"
    run_megalm(*args, f"train.run_dir={single}")
    reference = train_losses(single)
    assert max(r["grad_norm"] for r in metrics(single) if "grad_norm" in r) > 0.5  # clipping took part

    interleaved = torchrun(4, *args, f"train.run_dir={mixed}", "parallel.pp=4", "parallel.pp_schedule=interleaved",
                           "train.stop_at=3").stderr
    assert "pipeline schedule interleaved" in interleaved
    resumed = torchrun(2, *args, f"train.run_dir={mixed}", "parallel.pp=2", "parallel.pp_schedule=zbv").stderr
    assert "reassembled for tp=1 pp=2 dp=1" in resumed and "pipeline schedule zbv (torch " in resumed, resumed[-3000:]

    losses = train_losses(mixed)
    assert len(losses) == 6 and max(abs(a - b) / b for a, b in zip(losses, reference)) < 1e-5, (losses, reference)
    evals = [r["val_loss"] for r in metrics(mixed) if "val_loss" in r]
    assert evals == pytest.approx([r["val_loss"] for r in metrics(single) if "val_loss" in r], rel=1e-5)
    relative, _ = compare_parameters(mixed, single)
    assert relative < 1e-5, relative

    # a pipeline given fewer micro-batches than ranks: one line on each rank, exit 2, before training
    started = time.monotonic()
    refused = torchrun(2, *args, f"train.run_dir={tmp_path / 'refused'}", "parallel.pp=2", "train.micro_batch_size=4",
                       check=False)
    took = time.monotonic() - started
    line = ("]: config error: train.micro_batch_size: a pipeline of 2 ranks needs at least 2 micro-batches a "
            "step; train.global_batch=4 over dp=1 makes 1 of 4; use train.micro_batch_size=2 or less")
    # (the rank that tells it first: torchrun then stops the other, which may not have printed yet)
    assert refused.returncode != 0 and re.search(r"megalm\[[01]" + re.escape(line), refused.stderr), refused.stderr[-2000:]
    assert "exitcode  : 2" in refused.stderr and took < 30, took


# ------------------------------------------------------------------ every schedule at pp=2 and pp=4

SCHEDULES = [(name, pp) for name in ("1f1b", "interleaved", "zb", "zbv") for pp in (2, 4)]


def _gradients(rank: int, port: int, out) -> None:
    """One training step's loss and gradients (4 micro-batches, tied embeddings) under every schedule
    at pp=2 (dp=2, each replica given the same batch) and pp=4, against one process: the worst
    relative difference of the loss and of any gradient this rank holds."""
    from megalm.config import load_config
    from megalm.model.pipeline import PipelineModel
    from megalm.model.transformer import Transformer, one_process_names
    from megalm.parallel.mesh import build_mesh
    from megalm.train.pipeline import Pipeline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    base = load_config(CONFIG, ["model.n_layers=6", "model.d_model=32", "model.n_heads=2", "model.vocab_size=128",
                                "model.max_seq_len=16", "data.seq_len=16"])
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (2, 16), generator=generator), torch.randint(0, 128, (2, 16), generator=generator))
               for _ in range(4)]
    reference = Transformer(base.model, seed=1)
    expected = sum(reference(ids, (labels, 1 / len(batches))) for ids, labels in batches)
    expected.backward()
    wanted = {name: p.grad for p, name in one_process_names(reference).items()}
    for name, pp in SCHEDULES:
        cfg = base.replace("parallel", pp=pp, pp_schedule=name)
        mesh = build_mesh(1, pp, 4, rank)
        model = PipelineModel(cfg, mesh, seed=1)
        loss = Pipeline(model, mesh, len(batches), torch.device("cpu")).train_batch(batches, torch.tensor(1.0))
        worst = max((p.grad - wanted[n]).abs().max().item() / wanted[n].abs().max().item()
                    for p, n in one_process_names(model).items())
        out.put((name, pp, rank, abs(loss.item() - expected.item()) / expected.item(), worst))
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_schedule_at_pp_2_and_4_computes_one_processs_gradients():
    """1f1b, interleaved (v=2), zb and zbv, each at pp=2 and pp=4, with tied embeddings (a head on another
    rank than its embedding, or on the same one under zbv): the loss and every weight's gradient equal
    one process's to 1e-5 on every rank (train steps: the tests above and tests/test_parallel.py)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29000 + int(time.time() * 1000) % 2000
    procs = [ctx.Process(target=_gradients, args=(rank, port, out)) for rank in range(4)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=120) for _ in range(4 * len(SCHEDULES))]
    for p in procs:
        p.join(30)
    worst = {(name, pp): tuple(max(row[k] for row in rows if row[:2] == (name, pp)) for k in (3, 4))
             for name, pp in SCHEDULES}
    print("\nworst relative difference from one process (loss, gradients):",
          {k: f"{loss:.1e}, {grad:.1e}" for k, (loss, grad) in worst.items()})
    assert all(max(differences) < 1e-5 for differences in worst.values()), worst


# ------------------------------------------------------------------ idle time by schedule

# each of a chunk's forward, input-gradient and weight-gradient passes sleeps STEP_S. What a pass does besides
# sleeping counts as idle, and on a loaded machine it grows: a step's idle share runs over the theory's by
# about that time over STEP_S (a CI run: +0.056 for ZB-H1 with 40 ms passes). Few micro-batches and long passes
# keep it small for the same test time.
STEP_S = 0.08
PP, MICRO_BATCHES = 4, 4


class _Timed(torch.autograd.Function):
    """y = x * w, whose forward, input gradient and weight gradient each take STEP_S (a sleep,
    counted as busy time): the fixed-time stages the schedules' theory assumes."""
    busy = 0.0
    pass_s = STEP_S  # (0 for a step that only infers the shapes)

    @staticmethod
    def forward(ctx, x, w):
        _Timed._work()
        return x * w

    @staticmethod
    def backward(ctx, grad):
        dx = dw = None
        if ctx.needs_input_grad[0]:
            _Timed._work()
            dx = grad.contiguous()
        if ctx.needs_input_grad[1]:
            _Timed._work()
            dw = grad.sum().reshape(1)
        return dx, dw

    @staticmethod
    def _work():
        time.sleep(_Timed.pass_s)
        _Timed.busy += _Timed.pass_s


class _Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.u, self.w = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))

    def forward(self, x):
        return _Timed.apply(x * self.u, self.w)  # (x * u: the first chunk's input gradient is computed too)


def _schedule(name: str, v: int, rank: int, pp: int, chunk, micro_batches: int):
    """megalm's schedule over this rank's chunks (``chunk()`` each), as a pipeline of ``pp`` ranks runs it."""
    from megalm.model.pipeline import chunk_ranks
    from megalm.train.pipeline import Schedule

    owners = chunk_ranks(name, pp, v)
    mine = [i for i, r in enumerate(owners) if r == rank]
    return Schedule(name, [chunk() for _ in mine], mine, len(owners), micro_batches, torch.device("cpu"), None,
                    lambda y, target: y.sum()), 0 in mine, len(owners) - 1 in mine


def _idle(rank: int, port: int, schedules: list[tuple[str, int]], out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=PP)
    for name, v in schedules:
        schedule, first, last = _schedule(name, v, rank, PP, _Chunk, MICRO_BATCHES)
        steps = []  # (busy, wall) of each step
        # the first step infers the shapes, untimed; the least idle of the other two counts (a
        # loaded machine's stalls only add idle time)
        for step in range(3):
            _Timed.pass_s = STEP_S if step else 0.0
            args = (torch.ones(MICRO_BATCHES, 4),) if first else ()
            kwargs = {"target": torch.ones(MICRO_BATCHES, 4)} if last else {}
            dist.barrier()
            _Timed.busy, started = 0.0, time.perf_counter()
            schedule.step(*args, **kwargs)
            dist.barrier()
            steps.append((_Timed.busy, time.perf_counter() - started))
        out.put((name, rank, *min(steps[1:], key=lambda step: step[1])))
    dist.destroy_process_group()


@pytest.mark.slow
def test_each_schedules_idle_time_is_its_theorys():
    """4 ranks, 4 micro-batches, every pass STEP_S: the share of a step that the busiest rank sits idle
    is, within 0.05, 1F1B's (p - 1) / (m + p - 1), interleaved 1F1B's (p - 1) / (v m + p - 1) (v = 2) and
    ZB-H1's (p - 1) / (3 m + p - 1) (a third of 1F1B's bubble: the weight passes fill the rest); ZBV's
    under 0.6 of 1F1B's. (The busiest rank: torch's first stage has no input gradient to compute apart,
    so it skips that pass of the zero-bubble schedules.)"""
    schedules = [("1f1b", 1), ("interleaved", 2), ("zb", 1), ("zbv", 2)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29000 + int(time.time() * 1000) % 2000
    procs = [ctx.Process(target=_idle, args=(rank, port, schedules, out)) for rank in range(PP)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=120) for _ in range(PP * len(schedules))]
    for p in procs:
        p.join(30)
    idle = {name: 1 - max(busy for n, _, busy, _ in rows if n == name) /
            (sum(wall for n, _, _, wall in rows if n == name) / PP) for name, _ in schedules}
    print("\nidle share of the step (its busiest rank):", {k: round(v, 3) for k, v in idle.items()},
          "each rank's:", sorted((n, r, round(1 - busy / wall, 3)) for n, r, busy, wall in rows))
    p, m = PP, MICRO_BATCHES
    assert idle["1f1b"] == pytest.approx((p - 1) / (m + p - 1), abs=0.05)
    assert idle["interleaved"] == pytest.approx((p - 1) / (2 * m + p - 1), abs=0.05)
    assert idle["zb"] == pytest.approx((p - 1) / (3 * m + p - 1), abs=0.05)
    assert idle["zbv"] < 0.6 * idle["1f1b"]


# ------------------------------------------------------------------ memory held by a stage

HIDDEN = 1024  # a micro-batch of (1, HIDDEN, HIDDEN) fp32 values, 4 MiB: a message, an output, a gradient
MIB = 2 ** 20


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Probe(torch.autograd.Function):
    """The identity, noting the process's resident memory in forward and in backward."""
    peak = 0

    @staticmethod
    def forward(ctx, x):
        _Probe.peak = max(_Probe.peak, _resident())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _Probe.peak = max(_Probe.peak, _resident())
        return grad


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return _Probe.apply(x) * self.w


def _held(rank: int, port: int, variants: list[tuple[str, int]], out) -> None:
    """For each (stage, micro-batches): peak resident memory in the second step of a 2-rank 1F1B
    pipeline, above what the rank held before its first step (its share of the batch included)."""
    from torch.distributed.pipelining import PipelineStage

    from megalm.train.pipeline import schedule_class

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for variant, micro_batches in variants:
        if variant == "megalm":
            schedule = _schedule("1f1b", 1, rank, 2, _Scale, micro_batches)[0]
        else:  # torch's own stage, keeping outputs as its step() does by default
            schedule = schedule_class("1f1b")(PipelineStage(_Scale(), rank, 2, torch.device("cpu")), micro_batches,
                                              loss_fn=lambda y, target: y.sum(), scale_grads=False)
        batch = torch.ones(micro_batches, HIDDEN, HIDDEN) if rank == 0 else None
        target = torch.ones(micro_batches, 1) if rank == 1 else None
        start = _resident()
        for _ in range(2):
            _Probe.peak = 0  # (the second step's: torch's first allocates every receive buffer, megalm's drops them)
            schedule.step(*[batch] if rank == 0 else [], **{"target": target} if rank == 1 else {})
        out.put((variant, micro_batches, rank, (_Probe.peak - start) / MIB))
        del schedule, batch, target
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_stage_holds_only_what_its_schedule_still_needs(monkeypatch):
    """2 ranks, 1F1B, micro-batches of 4 MiB messages. torch's stage keeps a receive buffer for every
    micro-batch of the step (activations on rank 1, gradients on rank 0) for the whole run, each
    output until its backward, every micro-batch's last output, and every loss's graph, which holds
    the last stage's inputs and their gradients: its peak grows with the micro-batches (above 10
    messages at 8). megalm's holds a buffer from its receive to its backward, an output until its
    send is done and a graph until its backward: the same peak at 8 and 16 micro-batches (within one
    message) and at most 6 messages on either rank (the last rank's: the input, its gradient, the
    output, the weight's gradient temporary, the next micro-batch's receive posted early, the last
    exchange's send)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # freed tensors leave the resident set
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    variants = [("torch", 8), ("megalm", 8), ("megalm", 16)]
    port = 29000 + int(time.time() * 1000) % 2000
    procs = [ctx.Process(target=_held, args=(rank, port, variants, out)) for rank in range(2)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=120) for _ in range(2 * len(variants))]
    for p in procs:
        p.join(30)
    message = HIDDEN * HIDDEN * 4 / MIB
    held = {(variant, m, rank): mib / message for variant, m, rank, mib in rows}
    print("\npeak above the start in messages, by (stage, micro-batches, rank):",
          {k: round(v, 1) for k, v in sorted(held.items())})
    for rank in (0, 1):
        assert held["torch", 8, rank] > 10 and held["megalm", 8, rank] <= 6, held
        assert abs(held["megalm", 16, rank] - held["megalm", 8, rank]) < 1, held

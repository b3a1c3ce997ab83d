"""``megalm train``: the training loop, top to bottom.

set up the world -> data -> model -> DeepSpeed engine -> (resume) -> for each step: micro-batches
forward/backward, optimizer step, metrics, evaluation, checkpoint -> final eval, checkpoint, plot.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.checkpoint import store
from megalm.config import Config, validate
from megalm.data.loader import TrainLoader, merge_states, validation_sequences
from megalm.data.prepare import prepare, read_index
from megalm.observe.metrics import MetricsSink, ProgressBar, Throughput, drop_metrics_after, plot_loss
from megalm.model.transformer import parameter_count
from megalm.parallel.distributed import World, all_gather_objects, all_reduce_mean, init_distributed, launched_world_size
from megalm.parallel.mesh import Mesh, build_mesh
from megalm.parallel.tensor_parallel import IGNORE
from megalm.train.engine import build_engine, build_model, resolve_model_config

log = logging.getLogger("megalm")


@dataclass
class Summary:
    run_dir: Path
    steps: int
    tokens: int
    val_loss: float
    val_ppl: float
    wall_s: float
    checkpoint: Path | None
    unigram_entropy_nats: float


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption): the loop checkpoints at the next step and stops."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (ranks may receive the signal at different steps)."""
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: Config) -> Summary:
    t_start = time.time()
    validate(cfg, launched_world_size())  # layout errors surface before any process group starts
    world = init_distributed(cfg.train.device)
    t, par = cfg.train, cfg.parallel
    mesh = build_mesh(par.tp, par.pp, world.world_size, world.rank)
    dp = mesh.dp
    if world.is_main:
        log.info(mesh.describe())

    # ---- data (rank 0 prepares it if needed, or checks it matches the config; the others wait)
    if world.is_main:
        prepare(cfg.data)
    dist.barrier()
    index = read_index(cfg.data.dir)
    cfg = cfg.replace("model", **vars(resolve_model_config(cfg, index["vocab_size"])))

    run_dir = Path(t.run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        shutil.copyfile(Path(cfg.data.dir) / index["tokenizer"], run_dir / "tokenizer.json")  # for generate

    # ---- model and engine
    torch.manual_seed(t.seed)  # dropout; weights are seeded per layer (see tensor_parallel.init_layer)
    model = build_model(cfg, mesh)
    engine = build_engine(cfg, model, mesh)
    pipeline = mesh.pp > 1
    if world.is_main:
        log.info("model: %s (%s style), %.2fM parameters, %d layers x %d wide, vocab %d, seq %d",
                 cfg.model.name, cfg.model.style, parameter_count(cfg.model) / 1e6, cfg.model.n_layers,
                 cfg.model.d_model, cfg.model.vocab_size, cfg.data.seq_len)

    # ---- resume
    step, tokens, data_state = 0, 0, None
    found = store.find_resumable(run_dir) if (t.resume and world.is_main) else None
    found = all_gather_objects(found)[0]
    if found is not None:
        ckpt, meta = found
        store.load(engine, ckpt)
        step, tokens, data_state = meta["step"], meta["tokens"], meta["data_state"]
        log.info("resume: from %s (step %d, %d tokens)", ckpt, step, tokens)
    if world.is_main:
        drop_metrics_after(run_dir, step)  # rows of steps the checkpoint does not hold are redone

    loader = TrainLoader(cfg.data.dir, index, seq_len=cfg.data.seq_len, streams=cfg.data.streams,
                         dp_rank=mesh.dp_rank, dp_size=dp, micro_batch_size=t.micro_batch_size,
                         grad_accum=t.grad_accum, num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                         state=data_state)
    val = validation_sequences(cfg.data.dir, index, cfg.data.seq_len, cfg.data.eval_sequences)
    tokens_per_step = t.micro_batch_size * t.grad_accum * dp * cfg.data.seq_len
    # 6 FLOPs per matmul parameter per token (forward + backward), plus attention's scores and mixing
    flops_per_token = 6 * parameter_count(cfg.model, include_embeddings=False) + \
        12 * cfg.model.n_layers * cfg.model.d_model * cfg.data.seq_len

    sink = MetricsSink(cfg, run_dir, enabled=world.is_main)
    bar = ProgressBar(t.steps, step, enabled=world.is_main and t.progress)
    stop = StopFlag()
    throughput = Throughput()
    interval_losses: list[torch.Tensor] = []
    ckpt_path, val_loss, own_grad_norm = None, math.nan, None
    if world.is_main:
        log.info("train: %d steps of %d tokens (%d x %d micro-batches x %d ranks x seq %d), from step %d",
                 t.steps, tokens_per_step, t.micro_batch_size, t.grad_accum, dp, cfg.data.seq_len, step)

    # ---- the loop
    while step < t.steps:
        step_start = time.perf_counter()
        logging_step = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        lr = engine.get_lr()[0]  # this step's; the scheduler advances inside the optimizer step
        micro_batches = next(loader)
        if pipeline:  # the engine pulls the micro-batches and runs the 1F1B schedule itself
            loss = engine.train_batch(iter([(mb[:, :-1], mb[:, 1:]) for mb in micro_batches]))
            interval_losses.append(loss.detach().float())
        else:
            for micro in micro_batches:
                micro = micro.to(world.device, non_blocking=True)
                loss = engine(micro[:, :-1], micro[:, 1:])
                engine.backward(loss)
                if logging_step and engine.is_gradient_accumulation_boundary():
                    own_grad_norm = gradient_norm(engine, mesh)
                engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                interval_losses.append(loss.detach().float())
        step += 1
        tokens += tokens_per_step
        throughput.add(tokens_per_step)
        stopping = stop.agreed(world.device)

        if step % t.log_every == 0 or step == t.steps or stopping:
            loss_value = all_reduce_mean(torch.stack(interval_losses).mean().item(), world.device)
            interval_losses.clear()
            tokens_per_s = throughput.rate()
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:
                grad_norm = own_grad_norm
            sink.write({
                "step": step, "loss": loss_value, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens, "tokens_per_s": tokens_per_s, "step_time_s": time.perf_counter() - step_start,
                "tflops_per_rank": flops_per_token * tokens_per_s / world.world_size / 1e12,
            })
            bar.update(step, loss_value, lr, tokens_per_s)

        if step % t.eval_every == 0 or step == t.steps:
            val_loss = evaluate(engine, val, world, mesh, t.micro_batch_size)
            sink.write({"step": step, "tokens": tokens, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            throughput.rate()  # evaluation time is not training throughput

        if (t.save_every and step % t.save_every == 0) or step == t.steps or stopping:
            data_state = merge_states(all_gather_objects(loader.state_dict()))
            meta = {"tokens": tokens, "data_state": data_state, "config": cfg.to_dict(), "world_size": world.world_size}
            ckpt_path = store.save(engine, run_dir, step, meta, keep=t.keep_checkpoints)
            throughput.rate()
        if stopping:
            log.warning("stopped at step %d after a signal; resume by running the same command again", step)
            break

    bar.close()
    if math.isnan(val_loss):  # e.g. resumed a finished run: report where the model stands anyway
        log.info("train: no evaluation ran since step %d was reached; evaluating now", step)
        val_loss = evaluate(engine, val, world, mesh, t.micro_batch_size)
        sink.write({"step": step, "tokens": tokens, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    sink.close()
    if world.is_main:
        plot_loss(run_dir)
    return Summary(run_dir, step, tokens, val_loss, math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
                   time.time() - t_start, ckpt_path, index["unigram_entropy_nats"])


@torch.no_grad()
def gradient_norm(engine, mesh: Mesh) -> float | None:
    """Global gradient norm where DeepSpeed does not report one (its plain fp32 path computes it
    for clipping but keeps it to itself). Gradients are already averaged over data-parallel ranks;
    tensor-parallel shards are summed, replicated parameters counted once."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return None  # DeepSpeed's optimizer wrapper reports it after the step
    total = torch.zeros(1, dtype=torch.float64, device=next(engine.module.parameters()).device)
    for p in engine.module.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or mesh.tp_rank == 0):
            total += p.grad.double().pow(2).sum()
    if mesh.tp > 1:
        dist.all_reduce(total, group=mesh.tp_group)
    return total.sqrt().item()


@torch.no_grad()
def evaluate(engine, val: torch.Tensor, world: World, mesh: Mesh, batch_size: int) -> float:
    """Mean next-token loss over the validation sequences, split across data-parallel ranks.

    Every data-parallel rank runs the same number of equal micro-batches (ZeRO-3 and the pipeline
    engine need that): the rows a rank lacks are filled with labels that do not count (IGNORE).
    Summed losses and token counts then give the exact mean over the validation set.
    """
    dp, rank = mesh.dp, mesh.dp_rank
    per_rank = -(-len(val) // dp)
    per_rank = -(-per_rank // batch_size) * batch_size
    mine = val[rank::dp]
    pad = per_rank - len(mine)
    inputs = torch.cat([mine[:, :-1], val[:pad, :-1]])
    labels = torch.cat([mine[:, 1:], torch.full_like(val[:pad, 1:], IGNORE)])
    batches = list(zip(inputs.split(batch_size), labels.split(batch_size)))
    tokens = float(len(val) * (val.shape[1] - 1))
    loss_fn = engine.module.loss_fn  # Transformer and PipelineModule both hold it
    loss_fn.reduction = "sum"
    engine.eval()
    try:
        if mesh.pp > 1:
            # eval_batch averages the per-micro-batch sums over micro-batches and data-parallel ranks
            mean_sum = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            total = mean_sum.double().item() * len(batches) * dp
        else:
            total_t = torch.zeros(1, dtype=torch.float64, device=world.device)
            for x, y in batches:
                total_t += engine(x.to(world.device), y.to(world.device)).double()
            dist.all_reduce(total_t, group=mesh.dp_group)
            total = total_t.item()
    finally:
        loss_fn.reduction = "mean"
        engine.train()
    return total / tokens

"""``megalm bench ckpt``: checkpoint save and load speed next to the disk's own, and the async stall.

One process builds a real engine (a model preset, AdamW state after one step), then on the disk
that holds ``--dir`` measures, each ``--repeat`` times (median reported):

- the disk's raw sequential write (fsynced) and read of as many bytes as a checkpoint holds;
- a synchronous save (training waits for all of it), its GB/s as a fraction of the raw write;
- an asynchronous save followed by a training step's forward and backward: how long training
  waits (the stall: the save call, plus waiting for the host copy at the optimizer update) and
  how long the write takes;
- a resume (load) in GB/s against the raw read.

The page cache is emptied of the files before every read (``posix_fadvise``), so reads come from
the disk. Targets: synchronous save >= 70% of the raw write; async stall <= 10% of the sync save.

    megalm bench ckpt                      # gpt2-125m (~1.5 GB of state), results in benchmarks/results/
    megalm bench ckpt --model tiny --quick # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

SAVE_TARGET, STALL_TARGET = 0.70, 0.10


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megalm bench ckpt", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-125m", help="model preset whose state is saved")
    p.add_argument("--dir", default="runs/bench-ckpt", help="where checkpoints are written (the disk measured)")
    p.add_argument("--repeat", type=int, default=3, help="measurements of each kind (median reported)")
    p.add_argument("--quick", action="store_true", help="one repeat (a smoke run)")
    p.add_argument("--out", help="result directory (default benchmarks/results/<device>)")
    return p.parse_args(argv)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write_read(directory: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write ``nbytes`` sequentially (fsynced) and to read them back from the disk."""
    from megalm.common import CHUNK

    path = directory / "raw.bin"
    chunk = os.urandom(CHUNK)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, nbytes, CHUNK):
            f.write(chunk[:min(CHUNK, nbytes - offset)])
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    evict(path)
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return write_s, read_s


def build(model: str, run_dir: Path):
    """An engine with optimizer state (one step taken), its mesh and config, and a tokenizer."""
    from megalm.config import load_config
    from megalm.data.tokenizer import train_tokenizer
    from megalm.parallel.distributed import init_distributed
    from megalm.parallel.mesh import build_mesh
    from megalm.config import resolve
    from megalm.train.engine import build_engine, build_model

    cfg = load_config("quickstart", [f"model={model}", "data.seq_len=64", "train.micro_batch_size=1",
                                     "train.global_batch=1", f"train.run_dir={run_dir}", "train.keep_checkpoints=1"])
    world = init_distributed(cfg.train.device)
    mesh = build_mesh(1, 1, 1, 0)
    cfg = resolve(cfg, None, tokenizer_vocab=cfg.data.vocab_size)
    engine = build_engine(cfg, build_model(cfg, mesh), mesh)
    forward_backward(engine, cfg, world.device)
    engine.step()
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = run_dir / "tokenizer.json"
    train_tokenizer(["a small corpus for a tokenizer"], 300).save(str(tokenizer))
    return engine, mesh, cfg, tokenizer, world.device


def forward_backward(engine, cfg, device) -> None:
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), device=device)
    engine.backward(engine(x[:, :-1], x[:, 1:]))


def main(argv: list[str] | None = None) -> int:
    from megalm_kernels import benchmarking, provenance

    from megalm.checkpoint.store import Checkpointer
    from megalm.train.state import RNGState, TrainState

    args = parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    run_dir = Path(args.dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    engine, mesh, cfg, tokenizer, device = build(args.model, run_dir)
    state = TrainState(step=1)

    def checkpointer(async_save: bool) -> Checkpointer:
        c = cfg.replace("train", async_save=async_save)
        return Checkpointer(run_dir, engine, mesh, c, tokenizer, shared={"train": state}, per_rank={"rng": RNGState()})

    sync, background = checkpointer(False), checkpointer(True)
    timings: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "sync", "stall", "async", "load")}
    for i in range(repeat):
        start = time.perf_counter()
        sync.save(10 * i + 1)
        timings["sync"].append(time.perf_counter() - start)
        start = time.perf_counter()
        background.save(10 * i + 2)
        forward_backward(engine, cfg, device)  # training goes on while the save copies and writes
        background.before_step()
        timings["stall"].append(background.last.stall_s)
        background.wait()
        timings["async"].append(time.perf_counter() - start)
        ckpt = run_dir / "checkpoints" / f"step_{10 * i + 2:08d}"
        nbytes = sum(f.stat().st_size for f in ckpt.iterdir())
        for f in ckpt.iterdir():
            evict(f)
        start = time.perf_counter()
        sync.resume()
        timings["load"].append(time.perf_counter() - start)
        raw_write, raw_read = raw_write_read(run_dir, nbytes)
        timings["raw_write"].append(raw_write)
        timings["raw_read"].append(raw_read)
    med = {k: statistics.median(v) for k, v in timings.items()}
    gbps = {k: nbytes / med[k] / 1e9 for k in ("raw_write", "raw_read", "sync", "async", "load")}
    rows = [
        {"what": "disk: raw sequential write (fsync)", "seconds": med["raw_write"], "gb_per_s": gbps["raw_write"]},
        {"what": "disk: raw sequential read", "seconds": med["raw_read"], "gb_per_s": gbps["raw_read"]},
        {"what": "save, synchronous", "seconds": med["sync"], "gb_per_s": gbps["sync"],
         "vs_raw": gbps["sync"] / gbps["raw_write"], "target": f">= {SAVE_TARGET:.0%} of raw write"},
        {"what": "save, async: training stalled", "seconds": med["stall"],
         "vs_raw": med["stall"] / med["sync"], "target": f"<= {STALL_TARGET:.0%} of the sync save"},
        {"what": "save, async: written and committed", "seconds": med["async"], "gb_per_s": gbps["async"]},
        {"what": "load (resume)", "seconds": med["load"], "gb_per_s": gbps["load"],
         "vs_raw": gbps["load"] / gbps["raw_read"]},
    ]
    meta = provenance.device_info(device)
    meta.update(model=args.model, checkpoint_bytes=nbytes, host_copy_bytes=sync.host_copy_bytes, repeats=repeat,
                disk=str(run_dir.resolve()), save_target_met=gbps["sync"] >= SAVE_TARGET * gbps["raw_write"],
                stall_target_met=med["stall"] <= STALL_TARGET * med["sync"])
    columns = [("what", "measurement"), ("seconds", "seconds"), ("gb_per_s", "GB/s"),
               ("vs_raw", "fraction (of raw, or of sync save)"), ("target", "target")]
    out = benchmarking.results_dir(device, args.out)
    paths = benchmarking.write_results(out, "ckpt", meta, rows, columns)
    print(benchmarking.markdown_table(rows, columns))
    print(f"checkpoint of {nbytes / 1e9:.2f} GB ({args.model}); results in {paths['md']}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0

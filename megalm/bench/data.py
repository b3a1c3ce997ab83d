"""``megalm bench data``: training-loader throughput next to the raw read speed of the same shards,
and the fraction of a real run's step time spent waiting for data.

For the run's prepared data (prepared first if needed), one process measures:

- the raw read of every training shard file, from the disk (page cache emptied first) and warm,
  as tokens/s (the shards' tokens over the seconds to read their bytes);
- the loader (one data-parallel rank taking the whole global batch) with each ``--workers``
  count: steady-state tokens/s in total and per worker, after a warm-up;
- a short training run of the same config (``--train-steps``): the share of its wall time the
  trainer spent waiting for the next batch (``data_wait_s`` in metrics.jsonl).

Targets on the 2-core CPU machine: >= 5 M tokens/s per loader worker; < 1% of step time waiting.

    megalm bench data                                       # the quickstart's data
    megalm bench data quickstart data.seq_len=1024 train.global_batch=64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER_TARGET, WAIT_TARGET = 5e6, 0.01


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megalm bench data", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="quickstart", help="run config (path or shipped name)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to measure, comma-separated")
    p.add_argument("--tokens", type=float, default=2e7, help="tokens read per loader measurement")
    p.add_argument("--train-steps", type=int, default=60, help="steps of the training run (0: skip it)")
    p.add_argument("--out", help="result directory (default benchmarks/results/<device>)")
    return p.parse_args(argv)


def raw_read(paths: list[Path], cold: bool) -> float:
    """Seconds to read the files whole (after dropping them from the page cache when ``cold``)."""
    from megalm.bench.ckpt import evict

    if cold:
        for p in paths:
            evict(p)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - start


def loader_rate(cfg, sources, workers: int, tokens: float) -> float:
    """Steady-state tokens/s of one rank's loader taking the whole global batch."""
    from megalm.config import batch_layout
    from megalm.data.loader import TrainLoader
    from megalm.train.objective import CausalLM

    layout = batch_layout(cfg, 1)
    loader = TrainLoader(sources, layout, 0, CausalLM(), num_workers=workers, spool_dir=cfg.data.cache_dir)
    per_step = layout.global_batch * (cfg.data.seq_len + 1)
    for _ in range(3 + 2 * workers):  # workers start, fill their prefetch queues
        next(loader)
    steps = max(5, int(tokens // per_step))
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * per_step / (time.perf_counter() - start)


def data_wait(config: str, overrides: list[str], steps: int) -> tuple[dict, dict]:
    """Train ``steps`` steps of the config in a fresh process, logging three times; the first and
    the last interval's time waiting for data (the first includes the loader's start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "megalm.cli", "train", config, *overrides, f"train.run_dir={tmp}/run",
               f"train.steps={steps}", f"train.warmup_steps={min(5, steps - 1)}", f"train.log_every={max(1, steps // 3)}",
               f"train.eval_every={10 * steps}", "train.progress=false", "train.wandb.mode=disabled",
               "train.resume=never"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "data_wait_s" in r]
    return logged[0], logged[-1]


def main(argv: list[str] | None = None) -> int:
    from megalm_kernels import benchmarking, provenance

    from megalm.config import load_config
    from megalm.data.dataset import open_sources
    from megalm.data.prepare import ensure_prepared

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.mix:
        ensure_prepared(cfg.data)
    sources = open_sources(cfg.data, cfg.train.global_batch)
    rows = []
    for source in sources:
        if not source.location.is_local:
            continue
        paths = [Path(source.location.url(s.name)) for s in source.manifest.train]
        tokens = source.manifest.train_tokens
        nbytes = sum(p.stat().st_size for p in paths)
        for cold in (True, False):
            seconds = raw_read(paths, cold)
            rows.append({"what": f"raw read of {source.name}'s shards ({'disk' if cold else 'page cache'})",
                         "tokens_per_s": tokens / seconds, "mb_per_s": nbytes / seconds / 1e6})
    for workers in (int(w) for w in args.workers.split(",")):
        rate = loader_rate(cfg, sources, workers, args.tokens)
        per_worker = rate / max(1, workers)
        rows.append({"what": f"loader, {workers} workers" + (" (in the training process)" if not workers else ""),
                     "tokens_per_s": rate, "per_worker": per_worker, "target": f">= {WORKER_TARGET / 1e6:.0f} M/worker",
                     "met": per_worker >= WORKER_TARGET})
    meta = provenance.device_info(torch.device("cpu"))
    meta.update(config=args.config, overrides=args.overrides, seq_len=cfg.data.seq_len,
                global_batch=cfg.train.global_batch, cpu_count=os.cpu_count())
    if args.train_steps:
        first, last = data_wait(args.config, args.overrides, args.train_steps)
        rows.append({"what": f"training: waiting for data, steps 1-{first['step']} (with loader start-up)",
                     "fraction": first["data_wait_fraction"], "tokens_per_s": first["tokens_per_s"]})
        rows.append({"what": f"training: waiting for data, steady state (steps to {last['step']})",
                     "fraction": last["data_wait_fraction"], "tokens_per_s": last["tokens_per_s"],
                     "target": f"< {WAIT_TARGET:.0%}", "met": last["data_wait_fraction"] < WAIT_TARGET})
    columns = [("what", "measurement"), ("tokens_per_s", "tokens/s"), ("per_worker", "tokens/s per worker"),
               ("mb_per_s", "MB/s"), ("fraction", "fraction of step time"), ("target", "target"), ("met", "met")]
    out = benchmarking.results_dir(torch.device("cpu"), args.out)
    paths = benchmarking.write_results(out, "data", meta, rows, columns)
    print(benchmarking.markdown_table(rows, columns))
    print(f"results in {paths['md']}")
    return 0

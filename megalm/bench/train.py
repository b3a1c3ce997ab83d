"""``megalm bench train``: steady-state training speed of a config, for each variant asked for.

Each variant (a name and overrides, e.g. ``--variant compiled:train.compile=true``) trains
``--steps`` steps in a fresh process (under torchrun with ``--nproc`` > 1), logging every step;
the first ``--warmup`` steps (start-up, compilation, allocator warm-up) are left out and the
median of the rest is reported: tokens/s, TFLOP/s per GPU, MFU (against the GPU's dense peak;
none on CPUs), peak memory and the step-time breakdown. Results go to
``benchmarks/results/<device>/train.{json,md}`` with device, versions and commit, and ``train.png``:
bars of tokens/s, MFU and peak memory per variant.

    megalm bench train gpt2-125m.yaml --variant eager: --variant compiled:train.compile=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megalm bench train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config (path or shipped name)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every variant")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value,key=value (repeatable; default: the config as it is)")
    p.add_argument("--steps", type=int, default=30, help="steps per variant")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per variant")
    p.add_argument("--out", help="result directory (default benchmarks/results/<device>)")
    return p.parse_args(argv)


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs or ["default:"]:
        name, _, rest = spec.partition(":")
        out.append((name, [kv for kv in rest.split(",") if kv]))
    return out


def run_variant(config: str, overrides: list[str], steps: int, nproc: int) -> list[dict]:
    """Train ``steps`` steps in a fresh process; its per-step metrics rows."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        cmd = [*launcher, "-m", "megalm.cli", "train", config, *overrides, f"train.run_dir={tmp}/run",
               f"train.steps={steps}", f"train.warmup_steps={min(10, steps - 1)}", "train.log_every=1",
               f"train.eval_every={10 * steps}", "train.progress=false", "train.wandb.mode=disabled",
               "train.resume=never", "train.save=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"megalm bench train: {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]


def summarize(name: str, overrides: list[str], rows: list[dict], warmup: int) -> dict:
    steady = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    if not steady:
        raise SystemExit(f"megalm bench train: variant {name} logged no step after the {warmup} warm-up steps")

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    phases = {}
    for r in steady:
        for k, v in r.get("step_breakdown_s", {}).items():
            phases.setdefault(k, []).append(v)
    return {"variant": name, "overrides": " ".join(overrides), "tokens_per_s": median("tokens_per_s"),
            "tflops_per_gpu": median("tflops_per_gpu"), "mfu": median("mfu"), "mem_peak_gb": max(
                r["mem_peak_gb"] for r in steady), "step_time_s": median("step_time_s"),
            "breakdown": ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in phases.items()),
            "steps_measured": len(steady)}


def main(argv: list[str] | None = None) -> int:
    from megalm_kernels import benchmarking, provenance

    from megalm.observe.plot import save_bench

    args = parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit("megalm bench train: --steps must exceed --warmup")
    rows = []
    for name, extra in variants(args.variant):
        overrides = [*args.overrides, *extra]
        print(f"bench train: {name} ({' '.join(overrides) or 'as configured'}), {args.steps} steps ...", flush=True)
        rows.append(summarize(name, extra, run_variant(args.config, overrides, args.steps, args.nproc), args.warmup))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = provenance.device_info(device)
    meta.update(config=args.config, overrides=args.overrides, steps=args.steps, warmup=args.warmup, nproc=args.nproc)
    columns = [("variant", "variant"), ("overrides", "overrides"), ("tokens_per_s", "tokens/s"),
               ("tflops_per_gpu", "TFLOP/s per GPU"), ("mfu", "MFU"), ("mem_peak_gb", "peak memory GB"),
               ("step_time_s", "step s"), ("breakdown", "step breakdown (median)")]
    out = benchmarking.results_dir(device, args.out)
    paths = benchmarking.write_results(out, "train", meta, rows, columns, plot=save_bench)  # + train.png
    print(benchmarking.markdown_table(rows, columns))
    print(f"results in {paths['md']}")
    return 0

"""``megalm slurm submit``: write the Slurm job for a run into its run dir, and submit it.

    megalm slurm submit CONFIG --nodes N --gpus-per-node G --time T [--spare-nodes K] [--partition P]
        [--container-image IMG [--container-mounts M]] [--cpu] [overrides]

The script (``RUN_DIR/slurm/job.sbatch``) is the run's #SBATCH lines and arguments above the job
body every megalm job shares (``job.sh`` beside this module): the signal lead before the time limit
(``slurm.signal_lead_s``), requeue, logs appended per job under ``RUN_DIR/slurm/``. With
``--container-image`` every srun step runs in that image through pyxis/enroot.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

from megalm.config import Config, load_config, validate
from megalm.errors import ConfigError, SlurmError

JOB_BODY = Path(__file__).with_name("job.sh")


def parse(argv):
    p = argparse.ArgumentParser(prog="megalm slurm submit", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run YAML or a shipped run's name")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5000")
    p.add_argument("--nodes", type=int, required=True, help="nodes that train")
    p.add_argument("--spare-nodes", type=int, default=0, help="extra nodes held in the allocation: one takes the "
                                                              "place of a node that fails, without a requeue")
    p.add_argument("--gpus-per-node", type=int, required=True, help="processes per node (GPUs, or CPU ranks with --cpu)")
    p.add_argument("--time", required=True, help="time limit, e.g. 4:00:00; the job requeues itself before it")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--container-image", help="run every step in this image (pyxis/enroot srun flags)")
    p.add_argument("--container-mounts", help="pyxis mounts; default: the submit directory")
    p.add_argument("--cpu", action="store_true", help="CPU ranks over gloo: request no GPUs")
    p.add_argument("--sbatch", action="append", default=[], metavar="ARG", help="any further #SBATCH argument")
    p.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    return p.parse_intermixed_args(argv)


def script(args, cfg: Config, config_arg: str) -> str:
    """The job script for this run."""
    run_dir = Path(cfg.train.run_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.name)
    sbatch = [f"--job-name=megalm-{name}", f"--nodes={args.nodes + args.spare_nodes}", "--ntasks-per-node=1",
              f"--time={args.time}",
              f"--signal=B:USR1@{cfg.slurm.signal_lead_s}", "--requeue", "--open-mode=append",
              f"--output={run_dir}/slurm/%x-%j.out", f"--chdir={Path.cwd()}"]
    if args.spare_nodes:
        sbatch.append("--no-kill")  # a node that fails leaves the job its other nodes, for the spare to join
    if not args.cpu:
        sbatch.append(f"--gpus-per-node={args.gpus_per_node}")
    sbatch += [f"--partition={args.partition}"] * bool(args.partition) + [f"--account={args.account}"] * bool(args.account)
    sbatch += args.sbatch
    env = {"MEGALM_GPUS_PER_NODE": "0" if args.cpu else str(args.gpus_per_node),
           "MEGALM_PROCS_PER_NODE": str(args.gpus_per_node), "MEGALM_SPARE_NODES": str(args.spare_nodes)}
    if args.container_image:
        mounts = args.container_mounts or f"{Path.cwd()}:{Path.cwd()}"
        env["MEGALM_CONTAINER_FLAGS"] = (f"--container-image={args.container_image} --container-mounts={mounts} "
                                         f"--container-workdir={Path.cwd()}")
    lines = ["#!/usr/bin/env bash", f"# written by megalm slurm submit for {run_dir}",
             *(f"#SBATCH {a}" for a in sbatch), *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             "set -- " + " ".join(shlex.quote(a) for a in [config_arg, *args.overrides]), ""]
    return "\n".join(lines) + JOB_BODY.read_text()


def seconds(limit: str) -> int:
    """A Slurm time limit in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def submit(argv: list[str]) -> int:
    args = parse(argv)
    cfg = load_config(args.config, args.overrides)
    validate(cfg, args.nodes * args.gpus_per_node)  # before anything waits in a queue
    try:
        limit = seconds(args.time)
    except (ValueError, KeyError):
        raise ConfigError(f"--time {args.time!r}: not a Slurm time limit (e.g. 30, 4:00:00, 1-00:00:00)") from None
    if cfg.slurm.signal_lead_s >= limit:
        raise ConfigError(f"slurm.signal_lead_s: {cfg.slurm.signal_lead_s} s is not shorter than the time limit "
                          f"{args.time} ({limit} s): the job would be told to stop as it starts")
    config_arg = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config  # or a shipped run
    run_dir = Path(cfg.train.run_dir).resolve()
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    job = run_dir / "slurm" / "job.sbatch"
    job.write_text(script(args, cfg, config_arg))
    if args.dry_run:
        print(f"wrote {job} (not submitted)")
        return 0
    proc = subprocess.run(["sbatch", "--parsable", str(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {job}: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    name = next(line.split("=", 1)[1] for line in job.read_text().splitlines() if line.startswith("#SBATCH --job-name="))
    print(f"submitted job {job_id}: {args.nodes} nodes x {args.gpus_per_node} {'CPU ranks' if args.cpu else 'GPUs'}"
          f"{f' (and {args.spare_nodes} spare nodes)' if args.spare_nodes else ''}, "
          f"time limit {args.time}\n  script      {job}\n  log         {run_dir}/slurm/{name}-{job_id}.out\n"
          f"  checkpoints {run_dir}/checkpoints   (megalm ckpt list {run_dir})")
    return 0

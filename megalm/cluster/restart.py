"""After a job step of several nodes ends badly: start it again in the same allocation, and on
which nodes (a node named by the watchdog, or whose launcher never reported back, is left out
when a spare node can take its place).

    python -m megalm.cluster.restart CONFIG [overrides] --step ID --exit-code RC --restarts K
        --nodes N1,N2 --allocation N1,N2,N3 [--left-out N4]
    prints: ``restart NODES LEFT_OUT`` (comma-separated; ``-`` for none) | ``no``

Every node launcher of the step records how its node ended in ``RUN_DIR/slurm/steps/ID/NODE.json``
(megalm/cluster/node.py). A rank's own error would happen again: no restart (the requeue decides,
as before). A death without a word, a node that never reported (killed, or the node failed), or
the watchdog's verdict is restarted, from the newest checkpoint, up to ``slurm.max_restarts``
times per job, in a fresh rendezvous. The spare nodes are those of the allocation beyond the
job's ``--nodes`` (``megalm slurm submit --spare-nodes K``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from megalm.config import load_config
from megalm.errors import EXIT_STOPPED, EXIT_USAGE

NAMED = re.compile(r"rank \d+ on (\S+) \(pid \d+\)")  # how the watchdog names a rank (watchdog.py)


def step_dir(run_dir: Path, step: str) -> Path:
    return run_dir / "slurm" / "steps" / step


def decide(cfg, step: str, exit_code: int, restarts: int, nodes: list[str], allocation: list[str],
           left_out: list[str]) -> tuple[list[str] | None, list[str], str]:
    """(the next step's nodes or None, the nodes left out so far, why)."""
    folder = step_dir(Path(cfg.train.run_dir), step)
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}
    silent = [n for n in nodes if n not in records]
    if not records and exit_code:
        return None, left_out, "not restarting: no node of the step reported back (it did not start: see above)"
    if exit_code == 0 or (exit_code in (EXIT_STOPPED, EXIT_USAGE) and not silent):
        return None, left_out, f"not restarting: the step ended with exit code {exit_code}"
    lines = [line.split(" ", 1)[1] for record in records.values() for line in record["why"]]
    own = [line for line in lines if not line.startswith("watchdog:")]
    if own:
        return None, left_out, f"not restarting: a rank's own error would happen again: {own[0]}"
    if len(nodes) == 1 and not silent:
        return None, left_out, "not restarting: a one-node run's launcher restarts it itself, and has given up"
    if restarts >= cfg.slurm.max_restarts:
        return None, left_out, f"not restarting: {restarts} restarts in this job already (slurm.max_restarts)"
    named = [n for line in lines for n in NAMED.findall(line) if n in nodes]
    bad = list(dict.fromkeys(silent + named))
    spares = [n for n in allocation if n not in nodes and n not in left_out]
    swapped = dict(zip(bad, spares))  # as many as there are spares
    why = []
    for n in bad:
        said = "its launcher never reported back (the node or its processes died)" if n in silent \
            else "the watchdog named it"
        why.append(f"{n}: {said}; " + (f"left out, the spare {swapped[n]} takes its place" if n in swapped
                                       else "no spare node left, so it is used again"))
    following = [swapped.get(n, n) for n in nodes]
    return following, left_out + list(swapped), (
        f"restarting on {','.join(following)} from the newest checkpoint (restart {restarts + 1} of at most "
        f"{cfg.slurm.max_restarts}, slurm.max_restarts)" + (f"; {'; '.join(why)}" if why else ""))


def split(nodes: str) -> list[str]:
    return [n for n in nodes.split(",") if n and n != "-"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megalm.cluster.restart", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--step", required=True, help="the step's id (MEGALM_STEP: JOB.RESTART)")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--restarts", type=int, required=True, help="restarts this job made so far")
    p.add_argument("--nodes", required=True, help="the step's nodes, comma-separated")
    p.add_argument("--allocation", required=True, help="the job's nodes, comma-separated")
    p.add_argument("--left-out", default="-", help="nodes left out by earlier restarts ('-': none)")
    args = p.parse_intermixed_args(argv)
    following, left_out, why = decide(load_config(args.config, args.overrides), args.step, args.exit_code,
                                      args.restarts, split(args.nodes), split(args.allocation), split(args.left_out))
    print(f"megalm job: {why}", file=sys.stderr, flush=True)
    print(f"restart {','.join(following)} {','.join(left_out) or '-'}" if following else "no")
    return 0


if __name__ == "__main__":
    sys.exit(main())

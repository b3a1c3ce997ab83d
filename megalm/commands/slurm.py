"""``megalm slurm submit CONFIG --nodes N ...``: a Slurm job for the run (megalm/cluster/slurm.py)."""

import argparse


def add(sub) -> None:
    sp = sub.add_parser("slurm", help="run on a Slurm cluster: megalm slurm submit CONFIG --nodes N ...")
    sp.add_argument("action", choices=["submit"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="see megalm slurm submit --help")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.cluster import slurm

    return slurm.submit(args.rest)

"""``megalm bench kernels|ckpt|data|train``: benchmarks, their results under benchmarks/results/
(megalm/bench/; the kernels' own benchmark is megalm_kernels.bench)."""

import argparse


def add(sub) -> None:
    sp = sub.add_parser("bench", help="benchmarks (results go to benchmarks/results/)")
    sp.add_argument("what", choices=["kernels", "ckpt", "data", "train"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    sp.set_defaults(func=run)


def run(args) -> int:
    if args.what == "kernels":
        from megalm_kernels import bench

        return bench.main(args.rest)
    from megalm.bench import ckpt, data, train

    return {"ckpt": ckpt, "data": data, "train": train}[args.what].main(args.rest)

"""``megalm plot RUN_DIR...``: several runs' curves on one figure; ``--bench RESULTS.json``: a
benchmark's results drawn beside them."""

from pathlib import Path


def add(sub) -> None:
    sp = sub.add_parser("plot", help="curves of several runs on one figure (loss, throughput, MFU, memory)")
    sp.add_argument("run_dirs", nargs="*", help="run directories (each with metrics.jsonl)")
    sp.add_argument("--bench", help="instead: a megalm bench results JSON (train, ckpt, data), drawn beside it (or "
                                    "to --out) as bars per variant")
    sp.add_argument("--metric", action="append", help="a metrics.jsonl field to plot (repeatable; default: loss, "
                                                      "tokens_per_s, mfu, mem_peak_gb)")
    sp.add_argument("--out", help="the PNG to write (default: runs.png; with --bench, beside the results)")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.errors import UsageError
    from megalm.observe.plot import DEFAULT_METRICS, plot_bench, plot_runs

    if args.bench:
        print(plot_bench(Path(args.bench), args.out and Path(args.out)))
        return 0
    if not args.run_dirs:
        raise UsageError("give run directories, or --bench RESULTS.json")
    metrics = args.metric or DEFAULT_METRICS
    out = plot_runs([Path(d) for d in args.run_dirs], metrics, Path(args.out or "runs.png"))
    if out is None:
        raise UsageError(f"none of {args.run_dirs} logged any of {metrics}")
    print(out)
    return 0

"""``megalm eval CKPT --data DIR``: a checkpoint's loss, perplexity and bits per byte on a prepared
directory's held-out split, on any layout (megalm/train/eval_checkpoint.py)."""

import os


def add(sub) -> None:
    sp = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint on a prepared directory's "
                                     "held-out split (any layout; under torchrun for several processes)")
    sp.add_argument("ckpt", help="a run dir (its newest checkpoint) or a checkpoint directory")
    sp.add_argument("--data", required=True, help="a prepared data directory (made with the checkpoint's tokenizer)")
    sp.add_argument("--json", help="also write the results to this JSON file")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.micro_batch_size=4 "
                                                 "data.eval_sequences=256 (default: the whole validation split)")
    sp.set_defaults(func=run)


def run(args) -> int:
    import torch.distributed as dist

    from megalm.checkpoint import catalog
    from megalm.checkpoint.store import run_config
    from megalm.train.eval_checkpoint import check_writable, evaluate_checkpoint, record, table

    ckpt, _ = catalog.resolve_verified(args.ckpt)  # before the world starts: a damaged one fails in seconds
    cfg = run_config(ckpt, args.overrides, args.data)
    if int(os.environ.get("RANK", "0")) == 0:  # the rank that records: before any scoring, not after it
        check_writable(ckpt, args.json)
    capped = any(o.startswith("data.eval_sequences=") for o in args.overrides)
    result = evaluate_checkpoint(ckpt, cfg, capped).numbers()
    if dist.get_rank() == 0:
        print(table(result))
        record(result, ckpt, args.json)
    return 0

"""``megalm prepare [CONFIG] [overrides]``: clean and tokenize ``data.source`` into webdataset shards."""

from megalm.commands.args import with_config


def add(sub) -> None:
    sp = sub.add_parser("prepare", help="clean and tokenize data.source (text, jsonl, parquet, a saved HF dataset) "
                                        "into webdataset shards; an interrupted run resumes when run again")
    with_config(sp, required=False)
    sp.add_argument("--force", action="store_true", help="replace an existing prepared directory")
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.config import load_config
    from megalm.data.prepare import prepare

    config, overrides = args.config, args.overrides
    if config is not None and "=" in config:  # `megalm prepare data.source=...`: no run file given
        config, overrides = None, [config, *overrides]
    prepare(load_config(config, overrides).data, force=args.force)
    return 0

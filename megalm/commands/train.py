"""``megalm train CONFIG [overrides]``: train a model (a plain process, or each rank under torchrun)."""

from megalm.commands.args import with_config


def add(sub) -> None:
    sp = sub.add_parser("train", help="train a model (plain process, or under torchrun for data parallel)")
    with_config(sp)
    sp.set_defaults(func=run)


def run(args) -> int:
    from megalm.config import load_config
    from megalm.train.trainer import train

    return train(load_config(args.config, args.overrides)).report()

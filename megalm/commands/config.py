"""``megalm config show CONFIG [overrides]``: every field of the resolved config."""

from megalm.commands.args import with_config


def add(sub) -> None:
    sp = sub.add_parser("config", help="inspect configs")
    csub = sp.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    with_config(show)
    show.set_defaults(func=run)


def run(args) -> int:
    from megalm.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0

"""Arguments several commands share."""


def with_config(parser, required: bool = True) -> None:
    """The run file and dotted overrides that most commands take."""
    parser.add_argument("config", nargs=None if required else "?",
                        help="run YAML (e.g. configs/quickstart.yaml) or the name of a shipped run (quickstart)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 model.n_layers=2")

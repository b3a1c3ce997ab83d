"""The ``megalm`` command: its 14 verbs live in megalm/commands/, one module each (train, prepare,
config, quickstart, generate, eval, ckpt, finetune, classify, finetune-example, plan, plot, bench,
slurm). This module builds the parser from them, sets up logging, and ends every command the same
way: an error a user can fix is one line (``megalm: error: ...``, with the rank under a launcher)
and its exit code (megalm/errors.py), never a traceback.

A command that returns leaves the process without the interpreter's teardown: once every exit
handler has run (checkpoint writers joined, the run lock released, logs flushed), freeing the
thousands of objects torch and its compiler stack import takes ~1 s on a CPU, per process, for
nothing (``_leave``).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys

from megalm.commands import COMMANDS
from megalm.errors import MegalmError, exit_code, exit_now, one_line, prefix, say


def _setup_logging() -> None:
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"{prefix()}: %(message)s", stream=sys.stderr, force=True)
    # DeepSpeed logs every engine detail at INFO; keep its warnings only.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalm", description="Pretrain GPT-style language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so overrides after options
    # (`megalm finetune CKPT --task classify ... train.steps=50`) come back unparsed
    if extra and (not hasattr(args, "overrides") or any(item.startswith("-") for item in extra)):
        parser.parse_args(argv)  # argparse's own message and exit
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (MegalmError, OSError) as e:  # an OSError names its file: say it, no traceback
        say(f"{prefix()}: {one_line(e)}")
        return exit_code(e)
    except KeyboardInterrupt as e:  # what was interrupted has said what it kept (prepare: the work so far)
        say(f"{prefix()}: {one_line(e)}")
        return exit_code(e)


_returned: int | None = None  # the exit code of a command that returned (not one that raised)


def _leave() -> None:
    """Registered before anything else, so it runs after every other exit handler."""
    if _returned is not None:
        logging.shutdown()
        exit_now(_returned)


atexit.register(_leave)


def entry() -> None:
    """The ``megalm`` console script (and ``python -m megalm.cli``)."""
    global _returned
    _returned = int(main() or 0)
    sys.exit(_returned)


if __name__ == "__main__":
    entry()

"""What can go wrong, by kind, and how a ``megalm`` command ends for each.

Every error a user can fix is a :class:`MegalmError`: the command prints its message as one line
(``megalm: error: ...``, with the rank under a launcher) and exits with the kind's code, never with
a traceback. The exit codes are part of the interface (README, "Exit codes"):

- 0: finished;
- 1 (EXIT_ERROR): a runtime error — data, checkpoint, I/O, or a peer rank's error;
- 2 (EXIT_USAGE): a usage or config error, found before any work started;
- 3 (EXIT_WATCHDOG): the watchdog ended the run: a rank died or hung;
- 75 (EXIT_STOPPED): stopped by a signal (SIGTERM, SIGINT, SIGUSR1) before the last step, after
  saving a checkpoint: run the same command again to resume (75 is sysexits' EX_TEMPFAIL);
- 130 (EXIT_INTERRUPTED): Ctrl-C where there was nothing to save (set-up, prepare), or a second
  Ctrl-C that stops training without waiting for the save.

This module is at the bottom of the imports: it imports nothing of megalm.
"""

from __future__ import annotations

import os
import sys

FAILURES_FILE = "failures.txt"  # in a run dir: the first failure or watchdog verdict of each run that ended badly
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_WATCHDOG = 3
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C before anything could be saved (the shell's 128 + SIGINT)


class MegalmError(RuntimeError):
    """An error a user can fix, reported as one line; the command exits with ``exit_code``."""

    exit_code = EXIT_ERROR
    label = "error"


class UsageError(MegalmError):
    """A command-line argument that cannot work (``--top-p 0``, an empty prompt)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A configuration problem, reported with the key path."""

    label = "config error"


class DataError(MegalmError):
    """A problem with input data (source, tokenizer, shards), reported with the file's name."""


class CheckpointError(MegalmError):
    """No usable checkpoint where one was asked for, or one that cannot be used as asked."""


class SlurmError(MegalmError):
    """Slurm refused what megalm asked of it."""


class RunLocked(MegalmError):
    """Another live process holds the run dir."""


class TrainingDiverged(MegalmError):
    """Anomalies went on after every rollback a run may make (train.max_rollbacks)."""


class PeerFailed(MegalmError):
    """This rank stops because another rank failed first (its line is the message)."""


def say(line: str) -> None:
    """``line`` to stderr in one write: ranks that share a terminal or a job log never run their
    lines together (``print`` writes the text and its newline separately)."""
    sys.stderr.flush()  # what was written before comes before
    os.write(2, (line + "\n").encode(errors="replace"))


def exit_now(code: int) -> None:
    """End the process with ``code`` once stdout and stderr are flushed, skipping the interpreter's
    teardown: with torch loaded that takes 0.5 s, seconds on a loaded node, between a launcher's
    last line and its exit (and so the error reaching the job). For processes whose work is done
    and whose files are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(e: BaseException) -> int:
    """The exit code a command ends with over ``e``."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return getattr(e, "exit_code", EXIT_ERROR)


def prefix() -> str:
    """``megalm`` in a plain process, ``megalm[RANK]`` under a launcher: every line says whose it is."""
    return f"megalm[{os.environ['RANK']}]" if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" \
        else "megalm"


def one_line(e: BaseException) -> str:
    """The line a user reads for ``e``: a MegalmError's own message, else the exception's type and
    message (an OSError names its file) on one line."""
    if isinstance(e, MegalmError):
        text = f"{e.label}: {e}"
    elif isinstance(e, KeyboardInterrupt):
        text = "stopped by Ctrl-C"
    else:
        text = f"error: {type(e).__name__}: {e}"
    return " ".join(text.split())

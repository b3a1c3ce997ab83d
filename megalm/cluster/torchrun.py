"""torchrun, ending with the workers' own exit code instead of its failure report.

    python -m megalm.cluster.torchrun [torchrun's arguments]

When a worker fails, torchrun prints a table of exit codes and a traceback of its own, naming as
"root cause" whichever exit it noticed first: often a rank that only stopped because another one
failed. megalm's ranks say what failed themselves (the first failure, on every rank: see
megalm/train/watchdog.py), so this runs torchrun's own ``run`` and replaces that report with one
line of exit codes. It exits with the workers' code when they agree (75 when every rank stopped
after a signal's save, 2 for a config error), else 1; when torchrun itself gets a stop signal (Slurm
signals every process of a cancelled job) it stops its workers as torchrun does, saying so in one line.
"""

from __future__ import annotations

import signal

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from megalm.errors import exit_now, say


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except SignalException as e:  # e.g. Slurm's TERM to every process of a cancelled job
        say(f"megalm node: torchrun got {signal.Signals(e.sigval).name} and stopped its workers")
        return 128 + e.sigval
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        say("megalm node: workers ended with " + ", ".join(f"rank {r}: {_describe(c)}" for r, c in codes.items()))
        # once one worker exits non-zero torchrun sends the others SIGTERM; those it caught on their
        # way out (e.g. after a stop's save, in the interpreter's shutdown) do not decide the code
        own = {code for code in codes.values() if code != -signal.SIGTERM} or set(codes.values())
        return own.pop() if len(own) == 1 and min(own) > 0 else 1
    return 0


def _describe(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


if __name__ == "__main__":
    exit_now(main())  # (torchrun's agent has shut its workers and rendezvous down by now)

"""Every ``megalm`` command, one module each, its parser beside its handler: ``add(sub)`` registers
the command's arguments, ``run(args)`` does it and returns the exit code. ``megalm/cli.py`` builds
the parser from ``COMMANDS`` and turns errors into one line each (megalm/errors.py).

A command module imports what it needs inside ``run``: ``megalm config show`` must not pay for
importing torch and DeepSpeed.
"""

from megalm.commands import (bench, ckpt, classify, config, evaluate, finetune, finetune_example, generate, plan,
                             plot, prepare, quickstart, slurm, train)

COMMANDS = [train, prepare, config, quickstart, generate, evaluate, ckpt, finetune, classify, finetune_example,
            plan, plot, bench, slurm]


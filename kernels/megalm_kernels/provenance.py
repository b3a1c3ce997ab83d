"""Where a number was measured: the device, the software versions and the git commit. Every result
megalm writes carries them (benchmark files, checkpoints, run metrics' MFU peak lookup), so this is
the one home of those facts, below both the kernels' benchmark and the framework."""
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()}".strip()


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """HEAD of the checkout being measured, '+dirty' when it has local changes.

    MEGALM_GIT_COMMIT overrides it (a copy of the tree without .git, as on a lent GPU machine).
    Otherwise the checkout this code runs from (an editable install), else the current
    directory's (an installed package run from the project), else 'unknown'."""
    if os.environ.get("MEGALM_GIT_COMMIT"):
        return os.environ["MEGALM_GIT_COMMIT"]
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _head(where)
        if commit is not None:
            return commit
    return "unknown"


def _head(where: Path) -> str | None:
    """HEAD (+dirty) of the git checkout holding `where`, or None outside one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=where).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_info(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "host": platform.node(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info

"""megalm installed as a user installs it: wheels of megalm and megalm-kernels built with
``python -m build``, installed into a fresh virtual environment, used from a directory that is
not the checkout. The environment reuses this one's third-party packages (torch, DeepSpeed, …)
through a path file, but not its own editable megalm, so every import below comes from the wheels.
"""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, env, make_corpus

def run(*cmd, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env(), timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the two wheels; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    for project in (REPO / "kernels", REPO):
        run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", wheels, project, cwd=root)
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)  # this pip installs into it
    # third-party packages of this environment, by its site-packages as a plain path entry: after
    # the new venv's own site-packages, and with its .pth files (the editable megalm's finders) not
    # run, so megalm comes from the wheels. Its real path, not links to it: torch's C++ extensions
    # (DeepSpeed's shm op) are cached by their build flags, which name torch's include path, and a
    # second path would rebuild them (30 s each) for this and every later test.
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "reuse-test-env.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "--no-index",
        *sorted(wheels.glob("*.whl")), cwd=root)
    return venv / "bin"


def test_wheels_ship_configs_and_kernel_sources(installed):
    wheels = installed.parent.parent / "wheels"
    (megalm,) = wheels.glob("megalm-*.whl")
    (kernels,) = wheels.glob("megalm_kernels-*.whl")
    names = zipfile.ZipFile(megalm).namelist()
    assert "megalm/configs/quickstart.yaml" in names and "megalm/configs/model/tiny.yaml" in names
    assert not any(n.startswith("megalm_kernels/") for n in names)  # its own distribution
    assert "megalm_kernels/csrc/layer_norm_kernels.cu" in zipfile.ZipFile(kernels).namelist()


def test_installed_wheel_prepares_and_trains_from_elsewhere(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(installed / "python", "-c", "import megalm, megalm_kernels, importlib.metadata as m; "
                "print(megalm.__file__); print(megalm_kernels.__file__); print(m.distribution('megalm')._path)",
                cwd=work)
    assert all(str(installed.parent) in line for line in where.splitlines()[-3:]), where

    shown = run(installed / "megalm", "config", "show", "quickstart", "model=llama-tiny", cwd=work)
    assert "name: llama-tiny" in shown and "run_dir: runs/quickstart" in shown

    corpus = make_corpus(work / "corpus")
    data = [f"data.source={corpus}", "data.dir=prepared", "data.vocab_size=300", "data.shard_tokens=4000"]
    run(installed / "megalm", "prepare", *data, cwd=work)
    assert (work / "prepared/index.json").is_file()

    tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
            "train.global_batch=4", "train.micro_batch_size=4", "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=3", "data.eval_sequences=4", "train.progress=false", "train.wandb.mode=disabled"]
    log = run(installed / "megalm", "train", "quickstart", *data, *tiny, "train.run_dir=run", cwd=work)
    assert "done: 3 steps" in log
    assert (work / "run/checkpoints/latest").read_text() == "step_00000003"

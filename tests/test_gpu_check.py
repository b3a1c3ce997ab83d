"""The GPU session's one script, rehearsed on this CPU (benchmarks/gpu_check.sh --dry-run): every stage
runs the command it runs on the GPU, at its smallest, so a lent GPU's few minutes are not lost to a
typo; and every stage leaves its results where the device tool brings them back."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, env


def test_every_stage_of_the_gpu_check_runs_and_writes_its_results(data_dir, tmp_path):
    corpus = Path(data_dir).parent / "corpus"  # (the shared fixture's 24 modules, not the whole stdlib)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**env(), "OUT": str(tmp_path), "PYTHON": sys.executable, "MEGALM_DRY_SOURCE": str(corpus),
                               "MEGALM_DRY_DATA": str(data_dir)})
    out = tmp_path / "dry-run"
    said = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("tests", "kernels", "train-tiny"):
        assert f"gpu_check: {stage} done" in said, said
    assert "no nvidia-smi: a CPU rehearsal" in (out / "environment.txt").read_text()
    assert " tests collected" in (out / "logs" / "tests.txt").read_text()
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["meta"]["quick"] is True
    assert {"attention", "layer_norm", "rms_norm", "linear"} <= {r["op"] for r in kernels["rows"]}
    train = json.loads((out / "train-tiny" / "train.json").read_text())  # megalm bench train's steady state:
    eager, compiled, fp8 = train["rows"]  # 3 steps less 1 of warm-up, each variant in a process of its own
    assert (eager["variant"], compiled["variant"], compiled["overrides"]) == ("eager", "compiled", "train.compile=true")
    assert fp8["overrides"] == "train.compile=true train.fp8.layers=auto train.fp8.emulate=true"
    assert eager["steps_measured"] == compiled["steps_measured"] == fp8["steps_measured"] == 2
    assert "backward" in eager["breakdown"]
    assert eager["tokens_per_s"] > 0 and eager["mfu"] is None and eager["mem_peak_gb"] > 0  # (no MFU on a CPU)
    assert train["meta"]["git_commit"]
    # every override reached the runs: the tiny batch, on the fixture's data, nothing prepared in the checkout
    assert {f"data.dir={data_dir}", "train.global_batch=2", "train.device=cpu"} <= set(train["meta"]["overrides"])

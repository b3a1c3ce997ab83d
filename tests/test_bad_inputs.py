"""Bad inputs end in one line, not a traceback, and lose nothing (issue 18).

Each case runs the ``megalm`` command as a user would and checks the one line it ends with (the
last line of stderr), its exit code (2: usage or config, 1: runtime, 130: Ctrl-C), that no traceback
was printed, how soon it ended, and that what was there before (the run dir, its checkpoints and
``latest``, the prepared directory, the user's files) is as it was. The runs reuse the session
fixtures (a prepared corpus, a trained 6-step run) and copy what they damage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import xxhash

from megalm.config import _parse_yaml, load_config
from megalm.errors import ConfigError
from megalm.observe.metrics import MetricsSink, drop_metrics_after, read_metrics
from tests.helpers import CONFIG, REPO, TINY, Watched, env, megalm_cmd, run_megalm

QUICK_S = 60  # a refusal comes before any work: seconds of imports, even on a loaded 2-core machine


def fails(*args: str, code: int, timeout: int = 300, **kwargs) -> str:
    """Run ``megalm ARGS``; check it exits with ``code`` within QUICK_S, with no traceback; return
    the last stderr line."""
    started = time.monotonic()
    proc = run_megalm(*args, check=False, timeout=timeout) if not kwargs else \
        subprocess.run(megalm_cmd(*args), check=False, capture_output=True, text=True, env=env(), cwd=REPO,
                       timeout=timeout, **kwargs)
    elapsed = time.monotonic() - started
    assert proc.returncode == code, f"megalm {' '.join(args)}: exit {proc.returncode}, not {code}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert elapsed < QUICK_S, f"megalm {' '.join(args)} took {elapsed:.0f} s"
    return proc.stderr.strip().splitlines()[-1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) by relative path, with a hash of its bytes."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- checkpoints (4)


def test_every_command_that_reads_weights_refuses_a_damaged_checkpoint(single_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    flip_byte(ckpt / "rank_00000.bin", 1000)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    before = snapshot(run)

    meta = json.loads((ckpt / "meta.json").read_text())
    got = xxhash.xxh3_64((ckpt / "rank_00000.bin").read_bytes()).hexdigest()
    line = (f"megalm: error: checkpoint {ckpt} is damaged: {ckpt}/rank_00000.bin: checksum {got} differs from the "
            f"recorded {meta['files']['rank_00000.bin']['xxh3']} (corrupt); give an older checkpoint of the run "
            f"(`megalm ckpt list {run}` shows which verify)")
    assert fails("generate", str(run), "--prompt", "def f", code=1) == line
    assert fails("eval", str(run), "--data", str(data_dir), code=1) == line
    assert fails("classify", str(run), "--text", "import os", code=1) == line
    assert fails("finetune", str(run), "--task", "lm", "--data", str(data_dir),
                 f"train.run_dir={tmp_path / 'ft-lm'}", code=1) == line
    assert fails("finetune", str(run), "--task", "classify", "--train", str(records), "--eval", str(records),
                 f"train.run_dir={tmp_path / 'ft-classify'}", code=1) == line
    assert snapshot(run) == before  # the checkpoints, latest and metrics.jsonl as they were
    assert not (tmp_path / "ft-lm").exists() and not (tmp_path / "ft-classify").exists()

    # a checkpoint cut short (a torn copy) is named the same way, by size
    older = run / "checkpoints" / "step_00000003"
    with open(older / "rank_00000.pt", "r+b") as f:
        f.truncate(100)
    size = json.loads((older / "meta.json").read_text())["files"]["rank_00000.pt"]["size"]
    assert fails("generate", str(older), "--prompt", "def f", code=1) == (
        f"megalm: error: checkpoint {older} is damaged: {older}/rank_00000.pt: 100 bytes, expected {size} (torn "
        f"write?); give an older checkpoint of the run (`megalm ckpt list {run}` shows which verify)")


# ------------------------------------------------------------------------------- export (5, 6)


def test_ckpt_export_overwrites_nothing_unasked_and_names_a_bad_path(single_run, tmp_path):
    ckpt = single_run / "checkpoints" / (single_run / "checkpoints" / "latest").read_text().strip()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(mine)
    assert fails("ckpt", "export", str(single_run), str(mine), code=2) == (
        f"megalm: error: {mine}: holds 2 files (config.json, notes.txt); give a new or empty directory, or --force "
        f"to write into it, replacing any model.safetensors, config.json, tokenizer.json and tokenizer_config.json "
        f"there")
    assert snapshot(mine) == before

    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    assert fails("ckpt", "export", str(single_run), str(a_file), code=2) == (
        f"megalm: error: {a_file}: is a file; --format hf writes a directory: give a new or empty directory")
    assert fails("ckpt", "export", str(single_run), str(a_file), "--format", "torch", code=2) == (
        f"megalm: error: {a_file}: exists; give a new file name, or --force to replace it")
    assert fails("ckpt", "export", str(single_run), str(a_file / "hf"), code=2) == (
        f"megalm: error: {a_file / 'hf'}: cannot create the directory {a_file / 'hf'} (a file is in the way); give "
        f"a path where a directory can be made")
    assert fails("ckpt", "export", str(single_run), str(a_file / "model.pt"), "--format", "torch", code=2) == (
        f"megalm: error: {a_file / 'model.pt'}: cannot create the directory {a_file} (a file is in the way); give a "
        f"path where a directory can be made")
    assert fails("ckpt", "export", str(single_run), str(mine), "--format", "torch", code=2) == (
        f"megalm: error: {mine}: is a directory; --format torch writes one file: give a file name, e.g. "
        f"{mine}/model.pt")
    try:  # what the kernel says depends on the user: root is told ENOENT, others EACCES
        os.mkdir("/proc/megalm-export")
    except OSError as e:
        why = e.strerror
    assert fails("ckpt", "export", str(single_run), "/proc/megalm-export", code=2) == (
        f"megalm: error: /proc/megalm-export: cannot create the directory /proc/megalm-export ({why}); give a path "
        f"where a directory can be made")
    assert a_file.read_text() == "mine\n" and snapshot(mine) == before

    proc = run_megalm("ckpt", "export", str(single_run), str(mine), "--force")
    assert proc.stdout.strip() == f"exported {ckpt} as hf to {mine}"
    assert (mine / "notes.txt").read_text() == "keep me\n"  # --force replaces the export's files only
    assert json.loads((mine / "config.json").read_text())["model_type"] == "gpt2"


# ------------------------------------------------------------------------------- config files (5, 6)


def test_config_files_that_yaml_would_pass_are_refused(data_args, tmp_path):
    """Through `megalm train` where it would have trained (an empty file: the default run on the
    standard library; two sections: the last one's settings), else `megalm config show`, which
    reads configs the same way and starts faster."""
    run_dir = tmp_path / "run"
    args = [*TINY, *data_args, f"train.run_dir={run_dir}"]

    def refused(text: str | bytes, *overrides: str, command: str = "config show") -> str:
        path = tmp_path / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return fails(*command.split(), str(path), *args, *overrides, code=2)

    run_yaml = tmp_path / "run.yaml"
    assert refused(bytes(range(256))) == (
        f"megalm: config error: {run_yaml}: not a text file (byte 128 is not UTF-8); a config is a YAML file such as "
        f"configs/quickstart.yaml")
    empty = (f"megalm: config error: {run_yaml}: empty (no settings, only blank lines or comments); give the sections "
             f"to set (model, data, parallel, train), or name a shipped run (gpt2-125m, quickstart)")
    assert refused("", command="train") == empty
    assert refused("# train:\n#   lr: 3e-4\n\n") == empty
    assert refused("train:\n  steps: 5\ndata:\n  seq_len: 32\ntrain:\n  lr: 0.001\n", command="train") == (
        f"megalm: config error: {run_yaml}: key 'train' is given twice (lines 1 and 5); YAML would keep only the "
        f"last, so remove or merge one of them")
    assert refused("train:\n  lr: 0.001\n  steps: 5\n  lr: 0.01\n") == (
        f"megalm: config error: {run_yaml}: key 'lr' is given twice (lines 2 and 4); YAML would keep only the last, "
        f"so remove or merge one of them")
    (tmp_path / "my-model.yaml").write_text("n_layers: 2\nd_model: 64\nn_layers: 4\n")
    assert refused("model: my-model.yaml\n") == (
        f"megalm: config error: {tmp_path / 'my-model.yaml'}: key 'n_layers' is given twice (lines 1 and 3); YAML "
        f"would keep only the last, so remove or merge one of them")
    for yaml_value, shown in ((".inf", "inf"), (".nan", "nan"), ("-.inf", "-inf")):
        assert refused(f"train:\n  grad_clip: {yaml_value}\n") == (
            f"megalm: config error: train.grad_clip: expected a finite number, got {shown}")
    for override, shown in (("train.lr=inf", "inf"), ("train.lr=nan", "nan"), ("model.dropout=.nan", "nan")):
        key = override.split("=")[0]
        assert refused("train:\n  steps: 5\n", override) == (
            f"megalm: config error: {key}: expected a finite number, got {shown}")
    assert snapshot(run_dir) == {}


def test_yaml_merge_keys_are_not_taken_for_duplicates():
    """A merge key (<<) brings keys that the mapping then overrides: that is not a key given twice."""
    text = "base: &b\n  lr: 0.1\n  steps: 3\ntrain:\n  <<: *b\n  lr: 0.2\n"
    assert _parse_yaml(text, "x")["train"] == {"lr": 0.2, "steps": 3}
    with pytest.raises(ConfigError, match="key 'a' is given twice"):
        load_config(None, ["model={a: 1, a: 2}"])


# ------------------------------------------------------------------------------------ metrics (5)


def test_metrics_jsonl_stays_strict_json(tmp_path):
    cfg = load_config(None, ["train.wandb.mode=disabled"])
    sink = MetricsSink(cfg, tmp_path, enabled=True)
    sink.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    sink.write({"step": 2, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3})
    with pytest.raises(ValueError):  # a non-finite number this does not know how to flag fails, loudly
        sink.write({"step": 3, "nested": {"loss": math.nan}})
    sink.close()

    def strict(constant: str):
        raise AssertionError(f"metrics.jsonl holds a bare {constant}")

    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["loss", "grad_norm"]},
                    {"step": 2, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3}]
    drop_metrics_after(tmp_path, 1)  # rewritten on resume: still strict
    assert [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == rows[:1] == read_metrics(tmp_path)


# ------------------------------------------------------------------------------- prepared data (6)


def test_a_prepared_directory_without_its_tokenizer(data_dir, data_args, single_run, tmp_path):
    broken = tmp_path / "prepared"
    shutil.copytree(data_dir, broken)
    (broken / "tokenizer.json").unlink()
    before = snapshot(broken)
    line = (f"megalm: error: {broken}: a prepared directory without its tokenizer.json (index.json names it); put "
            f"back the one it was prepared with, or prepare it again: megalm prepare --force with this data.dir "
            f"and data.source")
    run_dir = tmp_path / "run"
    assert fails("train", CONFIG, *TINY, data_args[0], f"data.dir={broken}", f"train.run_dir={run_dir}", code=1) == line
    eval_run = tmp_path / "eval-run"
    shutil.copytree(single_run, eval_run)
    metrics = (eval_run / "metrics.jsonl").read_bytes()
    assert fails("eval", str(eval_run), "--data", str(broken), code=1) == line
    assert snapshot(broken) == before and snapshot(run_dir) == {}  # (the trainer may have made it, empty)
    assert (eval_run / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------------------------ generate (6)


def test_generate_options_are_checked_before_the_model_loads(single_run):
    def line(*options: str) -> str:
        return fails("generate", str(single_run), *options, code=2)

    assert line("--prompt", "x", "--top-p", "0") == "megalm: error: --top-p 0.0: must be in (0, 1] (1 disables it)"
    assert line("--prompt", "x", "--top-p", "1.5") == "megalm: error: --top-p 1.5: must be in (0, 1] (1 disables it)"
    assert line("--prompt", "x", "--top-k", "-1") == "megalm: error: --top-k -1: must be >= 0 (0 disables it)"
    assert line("--prompt", "x", "--temperature", "-0.5") == \
        "megalm: error: --temperature -0.5: must be a number >= 0 (0 means greedy)"
    assert line("--prompt", "x", "--temperature", "nan") == \
        "megalm: error: --temperature nan: must be a number >= 0 (0 means greedy)"
    assert line("--prompt", "x", "--max-tokens", "0") == \
        "megalm: error: --max-tokens 0: must be at least 1 (the number of tokens to generate)"
    assert line("--prompt", "") == "megalm: error: --prompt: empty; give the text to continue, e.g. --prompt 'def main():'"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu(single_run, data_args, tmp_path):
    why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
    run_dir = tmp_path / "run"
    assert fails("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}", "train.device=cuda", code=2) == (
        f"megalm: config error: train.device=cuda: {why}; use train.device=cpu or train.device=auto (a GPU when "
        f"there is one)")
    assert snapshot(run_dir) == {}
    assert fails("generate", str(single_run), "--prompt", "x", "--device", "cuda", code=2) == (
        f"megalm: error: --device cuda: {why}; use --device cpu (or auto, which takes a GPU when there is one)")


# ---------------------------------------------------------------------------------------- eval (6)


def test_eval_json_that_cannot_be_written_fails_before_scoring(single_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    before = snapshot(run)
    missing = tmp_path / "no-such-dir" / "eval.json"
    assert fails("eval", str(run), "--data", str(data_dir), "--json", str(missing), code=2) == (
        f"megalm: error: --json {missing}: cannot be written (No such file or directory); give a file in a writable "
        f"directory")
    assert fails("eval", str(run), "--data", str(data_dir), "--json", str(tmp_path), code=2) == (
        f"megalm: error: --json {tmp_path}: cannot be written (Is a directory); give a file in a writable directory")
    assert snapshot(run) == before  # no eval row in metrics.jsonl without its JSON file
    assert not missing.parent.exists()


# ------------------------------------------------------------------------------------- prepare (6)


def test_prepare_stopped_by_a_file_size_limit_resumes_to_the_same_result(data_dir, data_args, tmp_path):
    """RLIMIT_FSIZE makes writes past the limit fail with EFBIG (Python ignores SIGXFSZ), as a full
    disk makes them fail with ENOSPC."""
    index = json.loads((data_dir / "index.json").read_text())
    out, tmp = tmp_path / "prepared", tmp_path / ".prepared.tmp"
    # room for the tokenizer, the plan and the first shard; not for the largest shard
    limit = -(-max((data_dir / "tokenizer.json").stat().st_size, index["train"][0]["bytes"]) // 4096) * 4096
    assert limit < max(s["bytes"] for s in index["train"] + index["val"])
    args = ["prepare", CONFIG, *TINY, data_args[0], f"data.dir={out}"]

    def capped(n: int):
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    last = fails(*args, code=1, preexec_fn=capped(limit))
    assert re.fullmatch(
        rf"megalm: error: {re.escape(str(tmp))}/(train|val)-\d{{6}}\.tar: cannot write: File too large; "
        rf"[\d.]+ [GM]B free on its file system, and files are limited to {limit:,} bytes \(ulimit -f\); make room "
        rf"and run the same command again", last), last
    assert (tmp / "shards.jsonl").is_file() and not out.exists()  # the work so far is kept for the rerun

    proc = run_megalm(*args)
    assert f"data: resuming the preparation in {tmp}: " in proc.stderr
    done = json.loads((out / "index.json").read_text())
    assert (done["train"], done["val"], done["tokenizer_hash"]) == (index["train"], index["val"],
                                                                     index["tokenizer_hash"])
    assert not tmp.exists()

    # stopped in the scan (the tokenizer is too big to write): nothing a rerun could use is kept
    other, other_tmp = tmp_path / "other", tmp_path / ".other.tmp"
    last = fails("prepare", CONFIG, *TINY, data_args[0], f"data.dir={other}", code=1, preexec_fn=capped(4096))
    assert last.startswith(f"megalm: error: {other_tmp}/tokenizer.json: cannot write: File too large; "), last
    assert not other_tmp.exists() and not other.exists()


def test_ctrl_c_during_prepare_says_what_it_kept_and_a_rerun_finishes(data_dir, data_args, tmp_path):
    copies = 20  # the fixture's corpus 20 times over: a few seconds of shard writing to interrupt
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(copies):
        for f in Path(data_args[0].split("=", 1)[1]).iterdir():
            shutil.copyfile(f, corpus / f"{i}_{f.name}")
    out, tmp = tmp_path / "prepared", tmp_path / ".prepared.tmp"
    args = ["prepare", CONFIG, *TINY, f"data.source={corpus}", f"data.dir={out}", "data.dedup=false",
            f"data.tokenizer={data_dir / 'tokenizer.json'}"]  # no tokenizer to train: the scan is short
    job = Watched(megalm_cmd(*args))
    deadline = time.monotonic() + 120
    while not (tmp / "shards.jsonl").is_file():  # a shard is closed: the writing has begun
        assert job.proc.poll() is None, f"ended before writing a shard:\n{job.stderr[-3000:]}"
        assert time.monotonic() < deadline, job.stderr[-3000:]
        time.sleep(0.01)
    signalled = time.monotonic() - job.started
    masks = "".join(line for line in Path(f"/proc/{job.proc.pid}/status").read_text().splitlines(keepends=True)
                    if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    job.signal(signal.SIGINT)  # to the process group, pool workers included, as a terminal's Ctrl-C
    job.end(timeout=60)
    timeline = "\n".join(f"{t:6.2f} {line}" for t, line in job.lines)
    assert job.proc.returncode == 130, f"Ctrl-C at {signalled:.2f} s; its signal masks then:\n{masks}{timeline}"
    assert "Traceback" not in job.stderr, job.stderr[-3000:]  # nor from the pool's workers
    assert job.stderr.splitlines()[-2:] == [
        f"megalm: data: stopped; {tmp} keeps the work done so far: the same prepare run again finishes it",
        "megalm: stopped by Ctrl-C"]
    assert job.ended - signalled < 20, f"{job.ended - signalled:.1f} s from Ctrl-C to the end"
    assert not out.exists() and (tmp / "progress.json").is_file()

    proc = run_megalm(*args)
    resumed = re.search(rf"data: resuming the preparation in {re.escape(str(tmp))}: (\d+) of its shards are written",
                        proc.stderr)
    assert resumed and int(resumed.group(1)) >= 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not tmp.exists()
    done, index = json.loads((out / "index.json").read_text()), json.loads((data_dir / "index.json").read_text())

    def tokens(manifest: dict) -> int:
        return sum(s["tokens"] for s in manifest["train"] + manifest["val"])

    assert done["documents"] == copies * index["documents"]  # every document once: none lost, none twice
    assert tokens(done) == copies * tokens(index)

"""Config: presets, overrides, and every kind of bad input failing with the key path."""

import pytest

from megalm.cli import main
from megalm.config import batch_layout, load_config, validate
from megalm.errors import ConfigError
from tests.helpers import CONFIG, REPO, TINY, run_megalm


def test_quickstart_resolves_preset_and_overrides():
    cfg = load_config(REPO / "configs/quickstart.yaml", ["train.steps=50", "model.n_layers=2"])
    assert cfg.model.name == "tiny" and cfg.model.n_layers == 2 and cfg.train.steps == 50
    assert cfg.model.d_model == 192  # from configs/model/tiny.yaml


def test_every_model_preset_loads():
    for preset in ["tiny", "gpt2-125m", "gpt2-350m", "gpt-1.3b", "llama-7b", "llama-tiny"]:
        cfg = load_config(None, [f"model={preset}"])
        assert cfg.model.name == preset


@pytest.mark.parametrize("override, message", [
    (["train.stpes=5"], "train.stpes: unknown key; did you mean train.steps?"),
    (["modle.n_layers=2"], "modle: unknown key; did you mean model?"),
    (["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["train.zero_stage=4"], "train.zero_stage: must be 0, 1, 2 or 3"),
    (["model.style=bert"], "model.style: 'bert' is not one of"),
    (["model.n_heads=6", "model.n_kv_heads=4"], "model.n_kv_heads: model.n_heads=6 is not divisible by n_kv_heads=4"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model: 100 is not divisible by model.n_heads=3"),
    (["train.lr=-1"], "train.min_lr"),
    (["train.steps"], "expected key.path=value"),
    (["model=nosuch"], "model: no preset or model file named 'nosuch'"),
    (["parallel.cp=4"], "parallel.cp: attention's all-to-all gives each of cp=4 ranks a share of the 6 query heads"),
    (["parallel.cp=2", "data.seq_len=129"], "parallel.cp: data.seq_len=129 is not divisible into cp=2 parts"),
    (["parallel.cp=2", "model.n_kv_heads=3"], "parallel.cp: the 3 key/value heads per tensor rank must divide or be"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_config(REPO / "configs/quickstart.yaml", override)


def test_layout_needs_processes_and_divisible_batch():
    cfg = load_config(REPO / "configs/quickstart.yaml", ["parallel.dp=4"])
    with pytest.raises(ConfigError, match="parallel.dp: tp=1 x pp=1 x dp=4 needs 4 processes, but 1 were started"):
        validate(cfg, world_size=1)
    # any data-parallel size takes the global batch: accumulation follows, padding only where dp does not divide it
    cfg = load_config(REPO / "configs/quickstart.yaml", ["train.global_batch=48", "train.micro_batch_size=4"])
    assert [(b.micro_batch_size, b.grad_accum, b.padding) for b in (batch_layout(cfg, dp) for dp in (1, 6, 7, 64))] \
        == [(4, 12, 0), (4, 2, 0), (4, 2, 8), (1, 1, 16)]
    assert [len(batch_layout(cfg, 7).rows(r)) for r in range(7)] == [6, 7, 7, 7, 7, 7, 7]


def test_cli_exit_code_2_and_one_line(capfd, tmp_path):
    assert main(["config", "show", str(REPO / "configs/quickstart.yaml"), "train.stpes=1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["megalm: config error: train.stpes: unknown key; did you mean train.steps? "
                   "(valid: " + err[0].split("(valid: ")[1]]
    # a layout that needs more processes than exist fails before any process group or run dir
    run_dir = tmp_path / "run"
    assert main(["train", str(REPO / "configs/quickstart.yaml"), "parallel.dp=2", f"train.run_dir={run_dir}"]) == 2
    assert "parallel.dp: tp=1 x pp=1 x dp=2 needs 2 processes" in capfd.readouterr().err
    assert not run_dir.exists()


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(REPO / "configs/quickstart.yaml"), "model.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 3" in out and "name: tiny" in out and "zero_stage: 0" in out


def test_shipped_runs_by_name_and_model_files_beside_the_run(tmp_path):
    assert load_config("quickstart").model.name == "tiny"  # what an installed wheel resolves
    with pytest.raises(ConfigError, match="nosuch: no such config file, nor a shipped run .*quickstart"):
        load_config("nosuch")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("name: mine\nstyle: llama\nn_layers: 2\nd_model: 64\nn_heads: 4\n")
    run = tmp_path / "runs" / "run.yaml"
    run.parent.mkdir()
    run.write_text("model: {from: ../models/mine.yaml, n_layers: 3}\ntrain: {steps: 70}\n")
    cfg = load_config(run)
    assert (cfg.model.name, cfg.model.style, cfg.model.n_layers, cfg.train.steps) == ("mine", "llama", 3, 70)
    run.write_text("model: gpt2-125m\n")  # a shipped preset, from a run file anywhere
    assert load_config(run).model.n_layers == 12


def test_errors_after_the_data_is_known_are_one_line(data_args, tmp_path):
    """The model's vocabulary is checked against the tokenizer's once the data is prepared."""
    proc = run_megalm("train", CONFIG, *TINY, *data_args, "model.vocab_size=256", f"train.run_dir={tmp_path}/run",
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("megalm: config error: model.vocab_size: 256 is smaller than the "
                                                    "tokenizer's vocabulary of 512")
    assert "Traceback" not in proc.stderr

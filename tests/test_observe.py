"""Observability: FLOPs per token against torch's FLOP counter, MFU only where the peak is known, plots of several
runs and of benchmark results, the progress bar's MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalm.config import KernelsConfig, ModelConfig
from megalm.model.transformer import Transformer
from megalm.observe.flops import flops_per_token, mfu, peak_tflops


@pytest.mark.parametrize("style,kv_heads,tied", [("gpt2", 0, True), ("llama", 2, False)])
def test_formula_equals_torch_flop_counter(style, kv_heads, tied):
    # the plain-torch attention runs as matmuls, which the counter sees (CPU SDPA it does not count)
    m = ModelConfig(style=style, n_layers=3, d_model=96, n_heads=6, n_kv_heads=kv_heads, vocab_size=640,
                    max_seq_len=48, tie_embeddings=tied, kernels=KernelsConfig(attention="torch"))
    x = torch.randint(0, m.vocab_size, (2, 48))
    with FlopCounterMode(display=False) as counter:
        Transformer(m)(x, x).backward()
    assert counter.get_total_flops() == flops_per_token(m, 48) * x.numel()


def test_mfu_only_against_a_known_peak():
    assert peak_tflops("cpu x86_64", "bf16") is None and mfu(12.0, None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops("cpu x86_64", "bf16", override=100.0) == 100.0
    assert mfu(494.7, peak_tflops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(0.5)


def test_plot_draws_one_line_per_run_and_metric(tmp_path):
    import json

    from megalm.cli import main
    from megalm.observe.metrics import read_metrics
    from megalm.observe.plot import figure

    runs = []
    for i, name in enumerate(["a", "b", "c"]):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 5 - s / 10 - i, "tokens_per_s": 1000.0 * (i + 1), "mfu": None} for s in range(1, 6)]
        rows.append({"step": 5, "val_loss": 4.0 - i})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    fig = figure({r: read_metrics(r) for r in runs}, ["loss", "tokens_per_s", "mfu"])
    loss, speed = fig.axes  # mfu is null on CPU runs: no panel
    assert len(speed.lines) == 3 and len(loss.lines) == 6  # train and validation per run
    assert list(speed.lines[1].get_ydata()) == [2000.0] * 5
    out = tmp_path / "runs.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bench_train_results_plot_as_bars_per_variant(tmp_path):
    import json
    from pathlib import Path

    from megalm.observe.plot import plot_bench, train_bench_figure

    results = Path(__file__).resolve().parent.parent / "benchmarks/results/cpu-x86-64/train.json"
    data = json.loads(results.read_text())
    fig = train_bench_figure(data["rows"], data["meta"])
    speed, memory = fig.axes  # every MFU is null on a CPU: no panel
    assert [bar.get_height() for bar in speed.patches] == [r["tokens_per_s"] for r in data["rows"]]
    assert [bar.get_height() for bar in memory.patches] == [r["mem_peak_gb"] for r in data["rows"]]
    out = plot_bench(results, tmp_path / "train.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bench_draws_bench_train_results_only(tmp_path):
    """Kernel results are drawn by the kernels' own benchmark; megalm plot --bench says so."""
    import json

    from megalm.cli import main

    results = tmp_path / "kernels.json"
    results.write_text(json.dumps({"meta": {"device": "x", "torch": "2"}, "rows": [{"op": "attention"}]}))
    assert main(["plot", "--bench", str(results)]) == 2
    assert not (tmp_path / "kernels.png").exists()


def test_progress_bar_shows_mfu_only_where_it_is_known():
    from megalm.observe.metrics import bar_mfu

    assert bar_mfu(None) == ""
    assert bar_mfu(0.4123) == "  MFU 41.2%"

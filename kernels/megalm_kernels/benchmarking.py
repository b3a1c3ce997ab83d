"""Benchmark plumbing shared by megalm_kernels.bench and megalm's own benchmarks: measured
ceilings, timing, result files (stamped with megalm_kernels.provenance's facts).

A benchmark writes <out>/<name>.json (+ .md table, + .png plot), by default under
benchmarks/results/<device-slug>/, stamped with the device, python/torch/triton/CUDA versions and
git commit, and reports its numbers as fractions of two ceilings measured in the same run: the
bf16 matmul rate and the device-to-device copy bandwidth (bytes read + bytes written).
"""
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from megalm_kernels.provenance import device_name, device_slug


def bench_ms(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per call of fn(). On a GPU: triton's do_bench (CUDA events, cache
    flushed between calls); on CPU: wall clock after one warm-up call."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, dtype=torch.bfloat16) -> float:
    """Dense n×n×n matmul rate on random data (zeros run faster than real data on some GPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """The two rates every kernel is compared against, measured now on this device."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else (256 if quick else 1024)
    nbytes = 2**30 if gpu else (2**24 if quick else 2**28)
    return {"matmul_bf16_tflops": matmul_tflops(device, n), "matmul_n": n,
            "copy_gbps": copy_gbps(device, nbytes), "copy_bytes": nbytes}


def results_dir(device: torch.device, out: str | None = None) -> Path:
    """--out if given, else benchmarks/results/<device-slug> under the current directory."""
    path = Path(out) if out else Path("benchmarks") / "results" / device_slug(device_name(device))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key in row, header). Missing keys print as an em dash."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, meta: dict, rows: list[dict],
                  columns: list[tuple[str, str]], plot=None) -> dict[str, Path]:
    """<name>.json (meta + rows), <name>.md (header + table), and <name>.png from
    plot(rows, path, meta) when given and matplotlib is installed."""
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = [f"# {name} on {meta['device']}", ""]
    header += [f"- {k}: {_cell(v)}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    for key, value in meta.items():
        if isinstance(value, dict):
            header.append(f"- {key}: " + ", ".join(f"{k}={_cell(v)}" for k, v in value.items()))
        elif isinstance(value, list) and value:
            header.append(f"- {key}: " + "; ".join(map(str, value)))
    paths["md"].write_text("\n".join(header) + "\n\n" + markdown_table(rows, columns) + "\n")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed, so no {name}.png "
              "(pip install 'megalm-kernels[bench]' for the plot)", file=sys.stderr)
    elif plot is not None:
        paths["png"] = out_dir / f"{name}.png"
        plot(rows, paths["png"], meta)
    return paths

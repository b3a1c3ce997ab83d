"""Time the fused kernels against torch on this device (also run as `megalm bench kernels`).

Attention (Triton vs torch SDPA vs the explicit torch reference) in TFLOP/s, causal counted as
half the work; LayerNorm / RMSNorm (Triton, CUDA extension, Apex, torch eager, torch.compile) in
GB/s of the bytes the op must move. Each row is also given as a fraction of the bf16 matmul rate
or copy bandwidth measured in the same run, and as a speedup over the other implementations.
Linear layers' matmuls in bf16 against FP8 (torchao's float8 training, tensorwise and rowwise
scaling, the casts included: fp8_linear.py), forward and backward, per (tokens, out, in) shape: the
table ``train.fp8.layers=auto`` can decide from (``train.fp8.timings``).

    python -m megalm_kernels.bench                       # full sweep on the GPU
    python -m megalm_kernels.bench --quick --out DIR     # CPU smoke run: tiny shapes, torch only

The plot needs matplotlib (pip install 'megalm-kernels[bench]'); without it the tables are
still written.
"""
import argparse
import sys
import traceback

import torch
import torch.nn.functional as F

from . import attention, benchmarking, fp8_linear, layer_norm, provenance, rms_norm
from .dispatch import apex_norms

SEQS = (512, 1024, 2048, 4096, 8192, 16384)
HIDDENS = (1024, 2048, 4096, 8192, 12288, 16384)
TOKENS_PER_BATCH = 16384  # batch = tokens / seq, as in the FlashAttention papers' sweeps
MODEL_DIM = 2048  # heads = MODEL_DIM / head_dim
NORM_ELEMENTS = 2**26  # rows = this / hidden: 128 MiB of bf16 per tensor, well past L2
REFERENCE_MAX_SEQ = 2048  # the explicit reference stores B·H·T² scores


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m megalm_kernels.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and torch paths only (a CPU smoke run)")
    p.add_argument("--out", help="result directory (default benchmarks/results/<device>)")
    p.add_argument("--ops", default="attention,norms,fp8", help="comma list: attention,norms,fp8")
    p.add_argument("--seqs", default=None, help="attention sequence lengths, comma list")
    p.add_argument("--hiddens", default=None, help="norm hidden sizes, comma list")
    p.add_argument("--linears", default=None,
                   help="linear shapes to time in bf16 and FP8, tokens x out x in, comma list (e.g. 8192x4096x4096)")
    p.add_argument("--impls", default=None,
                   help="only these implementations (comma list), e.g. triton,sdpa,torch")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--name", default="kernels",
                   help="result file stem, e.g. kernels-attention for a partial sweep")
    return p.parse_args(argv)


def _ints(text, default):
    return tuple(int(v) for v in text.split(",")) if text else default


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention_shapes(args):
    if args.quick:
        return [(1, 4, hkv, t, 32, causal) for t in (64, 128) for causal in (False, True)
                for hkv in (4, 2)]
    shapes = []
    for t in _ints(args.seqs, SEQS):
        b = max(1, TOKENS_PER_BATCH // t)
        for d in (64, 128):
            for causal in (False, True):
                shapes.append((b, MODEL_DIM // d, MODEL_DIM // d, t, d, causal))
        shapes.append((b, MODEL_DIM // 128, MODEL_DIM // 128 // 8, t, 128, True))  # GQA 8:1
    return shapes


def attention_flops(b, hq, t, d, causal, mode):
    forward = 4 * b * hq * t * t * d * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)  # backward = 2.5 × forward


def attention_impls(args, t):
    impls = ["sdpa", "torch"] if args.quick else ["triton", "sdpa", "torch"]
    impls = [i for i in impls if i != "torch" or t <= REFERENCE_MAX_SEQ]
    return _selected(impls, args)


def bench_attention(args, device, dtype):
    rows = []
    for b, hq, hkv, t, d, causal in attention_shapes(args):
        g = torch.Generator(device=device).manual_seed(t)
        q = torch.randn(b, hq, t, d, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(b, hkv, t, d, device=device, dtype=dtype, generator=g)
                for _ in range(2))
        do = torch.randn_like(q)
        shape = f"B{b} H{hq}/{hkv} T{t} D{d}" + (" causal" if causal else "")
        for impl in attention_impls(args, t):
            for mode in ("fwd", "fwd+bwd"):
                fn = _attention_call(q, k, v, do, causal, impl, mode)
                ms = _time(fn, device, f"attention {impl} {mode} {shape}")
                if ms is None:
                    continue
                rows.append({"op": "attention", "mode": mode, "shape": shape, "seq": t,
                             "head_dim": d, "causal": causal, "gqa": hq // hkv, "impl": impl,
                             "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                             "rate": attention_flops(b, hq, t, d, causal, mode) / ms / 1e9,
                             "unit": "TFLOP/s"})
    return rows


def _attention_call(q, k, v, do, causal, impl, mode):
    if mode == "fwd":
        return lambda: attention(q, k, v, causal=causal, impl=impl)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def forward_backward():
        out = attention(*leaves, causal=causal, impl=impl)
        torch.autograd.grad(out, leaves, do)
    return forward_backward


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------

NORM_OPS = ("layer_norm", "rms_norm", "rms_norm+residual")


def norm_shapes(args):
    if args.quick:
        return [(256, 256), (256, 1024)]
    return [(NORM_ELEMENTS // n, n) for n in _ints(args.hiddens, HIDDENS)]


def norm_bytes(op, rows, n, itemsize, mode):
    """Fewest bytes each pass must move: activations once each way, parameters, row stats."""
    act = rows * n * itemsize
    params = n * itemsize * (2 if op == "layer_norm" else 1)
    stats = rows * 4 * (2 if op == "layer_norm" else 1)
    residual = op.endswith("+residual")
    fwd = act * (2 + 2 * residual) + params + stats       # x (+r) in; y (+h) out
    bwd = act * (3 + residual) + 2 * params + stats       # dy, x (+dh) in; dx out; dw (+db)
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}[mode]


def norm_impls(args, op):
    if args.quick:
        impls = ["torch"]
    else:
        impls = ["triton", "torch"]
        if op == "layer_norm":
            impls.insert(1, "cuda")
        if apex_norms() is not None:
            impls.append("apex")
        if not args.no_compile:
            impls.append("compile")
    return _selected(impls, args)


def _eager_norm(op):
    """The unfused torch version torch.compile gets to fuse."""
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b)
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w)
    return lambda x, r, w, b: (F.rms_norm(x + r, x.shape[-1:], w), x + r)


def _norm_fn(op, impl):
    if impl == "compile":
        return torch.compile(_eager_norm(op))
    residual = op.endswith("+residual")
    if op == "layer_norm":
        return lambda x, r, w, b: layer_norm(x, w, b, impl=impl)
    return lambda x, r, w, b: rms_norm(x, w, residual=r if residual else None, impl=impl)


def bench_norms(args, device, dtype):
    rows = []
    for m, n in norm_shapes(args):
        g = torch.Generator(device=device).manual_seed(n)
        x, r, dy = (torch.randn(m, n, device=device, dtype=dtype, generator=g) for _ in range(3))
        w = torch.randn(n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, device=device, dtype=dtype, generator=g)
        for op in NORM_OPS:
            for impl in norm_impls(args, op):
                fn = _norm_fn(op, impl)
                for mode in ("fwd", "fwd+bwd"):
                    call = _norm_call(fn, x, r, w, b, dy, mode)
                    ms = _time(call, device, f"{op} {impl} {mode} {m}x{n}")
                    if ms is None:
                        continue
                    rows.append({"op": op, "mode": mode, "shape": f"{m}x{n}", "hidden": n,
                                 "impl": impl, "dtype": str(dtype).removeprefix("torch."),
                                 "ms": ms, "unit": "GB/s",
                                 "rate": norm_bytes(op, m, n, x.element_size(), mode) / ms / 1e6})
    return rows


def _norm_call(fn, x, r, w, b, dy, mode):
    if mode == "fwd":
        return lambda: fn(x, r, w, b)
    leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]

    def forward_backward():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)  # (y, h) with a residual
        torch.autograd.grad(outs, leaves, [dy] * len(outs), allow_unused=True)
    return forward_backward


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

SKIPPED: list[str] = []


# (out, in) of the linear layers of gpt2-124M, gpt-1.3b and a 7B Llama (q, q|k|v, MLP up, down), at
# LINEAR_TOKENS tokens per micro-batch
LINEAR_SHAPES = ((768, 768), (2304, 768), (3072, 768), (768, 3072), (2048, 2048), (6144, 2048), (8192, 2048),
                 (2048, 8192), (4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008))
LINEAR_TOKENS = (8192,)


def linear_shapes(args):
    if args.linears:
        return [tuple(int(v) for v in s.split("x")) for s in args.linears.split(",")]
    if args.quick:
        return [(256, 256, 256)]
    return [(m, n, k) for m in LINEAR_TOKENS for n, k in LINEAR_SHAPES]


def bench_fp8_linears(args, device):
    """bf16 against FP8 linears (both recipes; emulated off CUDA), forward+backward with every cast."""
    from .fp8_linear import RECIPES, Float8Product

    emulate = device.type != "cuda"
    impls = {"bf16": F.linear, **{f"fp8-{r}": Float8Product(r, emulate) for r in RECIPES}}
    rows = []
    for m, n, k in linear_shapes(args):
        for impl, product in impls.items():
            ms = _time(fp8_linear.linear_call(m, n, k, product, device), device, f"linear {impl} {m}x{n}x{k}")
            if ms is None:
                continue
            rows.append({"op": "linear", "mode": "fwd+bwd", "shape": f"{m}x{n}x{k}", "impl": impl,
                         "dtype": "bfloat16", "emulated": emulate and impl != "bf16", "ms": ms, "unit": "TFLOP/s",
                         "rate": 6 * m * n * k / ms / 1e9})
    return rows


def _selected(impls, args):
    return [i for i in impls if not args.impls or i in args.impls.split(",")]


def _time(fn, device, label):
    """Median ms, or None (noted in the results) when this implementation fails here."""
    try:
        return benchmarking.bench_ms(fn, device)
    except Exception as e:  # one failing implementation must not lose the whole sweep
        SKIPPED.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        traceback.print_exc(file=sys.stderr)
        return None


def add_comparisons(rows, ceilings):
    """Fraction of the ceiling, and speedup of each row over every other impl on its case."""
    ceiling = {"TFLOP/s": ceilings["matmul_bf16_tflops"], "GB/s": ceilings["copy_gbps"]}
    by_case = {}
    for row in rows:
        row["of_ceiling"] = row["rate"] / ceiling[row["unit"]]
        by_case.setdefault((row["op"], row["mode"], row["shape"]), {})[row["impl"]] = row["ms"]
    for row in rows:
        for other, ms in by_case[(row["op"], row["mode"], row["shape"])].items():
            if other != row["impl"]:
                row[f"x_vs_{other}"] = ms / row["ms"]


COLUMNS = [("op", "op"), ("mode", "mode"), ("shape", "shape"), ("impl", "impl"), ("ms", "ms"),
           ("rate", "rate"), ("unit", "unit"), ("of_ceiling", "of ceiling"),
           ("x_vs_sdpa", "× vs sdpa"), ("x_vs_torch", "× vs torch"),
           ("x_vs_compile", "× vs compile"), ("x_vs_apex", "× vs apex"),
           ("x_vs_triton", "× vs triton"), ("x_vs_bf16", "× vs bf16")]


def plot(rows, path, meta):
    """Attention TFLOP/s against sequence length; norm GB/s against hidden size."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(14, 5))
    axes = fig.subplots(1, 2)
    panels = [(axes[0], "attention", "seq", "TFLOP/s", meta["ceilings"]["matmul_bf16_tflops"]),
              (axes[1], None, "hidden", "GB/s", meta["ceilings"]["copy_gbps"])]
    for ax, op, x_key, unit, ceiling in panels:
        series = {}
        for row in rows:
            if row["unit"] != unit or row["mode"] != "fwd+bwd" or row["op"] == "linear":
                continue
            if op == "attention":
                label = (f"{row['impl']} d{row['head_dim']}"
                         f"{' causal' if row['causal'] else ''}{' gqa' if row['gqa'] > 1 else ''}")
            else:
                label = f"{row['op']} {row['impl']}"
            series.setdefault(label, []).append((row[x_key], row["rate"]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(ceiling, color="grey", linestyle="--", label=f"measured ceiling {ceiling:.3g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{unit} (forward + backward)")
        ax.set_title(f"{'attention' if op else 'norms'}, {meta['dtype']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · "
                 f"{meta['git_commit'][:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: only `--quick` (a CPU smoke run) is meaningful here",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    SKIPPED.clear()
    meta = provenance.device_info(device)
    meta.update(quick=args.quick, dtype=str(dtype).removeprefix("torch."))
    meta["ceilings"] = benchmarking.measure_ceilings(device, quick=args.quick)
    ops = args.ops.split(",")
    rows = []
    if "attention" in ops:
        rows += bench_attention(args, device, dtype)
    if "norms" in ops:
        rows += bench_norms(args, device, dtype)
    if "fp8" in ops:
        rows += bench_fp8_linears(args, device)
    add_comparisons(rows, meta["ceilings"])
    meta["skipped"] = list(SKIPPED)
    out = benchmarking.results_dir(device, args.out)
    paths = benchmarking.write_results(out, args.name, meta, rows, COLUMNS, plot=plot)
    print(benchmarking.markdown_table(rows, COLUMNS))
    print("\nceilings: " + ", ".join(f"{k}={v:.4g}" for k, v in meta["ceilings"].items()))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the Triton kernels for a CUDA target on any machine, no GPU needed, and report what
the compiler made of them: registers, spilled bytes, shared memory, Hopper tensor-core (HGMMA)
instructions.

The interpreter runs kernels as Python and accepts code the GPU compiler rejects; this catches
that, and shows which tile configurations spill before any GPU time is spent.

    python -m megalm_kernels.compile_report            # every autotune tile, norm layouts
    python -m megalm_kernels.compile_report --quick    # one configuration per kernel

Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLOAT_ARGS = {"qk_scale", "sm_scale", "eps"}
INT_ARGS = {"H", "H_KV", "GROUP", "T", "M", "N", "rows_per_program"}
FP32_POINTERS = {"LSE", "DELTA", "MEAN", "RSTD", "DW_PART", "DB_PART", "W", "B"}


def _arg_type(name: str, dtype: str) -> str:
    if name in FLOAT_ARGS:
        return "fp32"
    if name in INT_ARGS or name.startswith("stride"):
        return "i32"
    return "*fp32" if name in FP32_POINTERS else f"*{dtype}"


def _tool(name: str) -> str:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else (shutil.which(name) or name)


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, dtype="bf16",
                   arch=90) -> dict:
    """Compile one configuration for sm_<arch>; returns its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else _arg_type(n, dtype)
                 for n in fn.arg_names}
    # What the JIT sees at a real launch with aligned, contiguous tensors: pointers and strides
    # divisible by 16. Without this the loads would not vectorize, unlike on the GPU.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or n.startswith("stride")}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {"regs": int(regs), "spill_bytes": int(stack), "smem": kernel.metadata.shared,
            "hgmma": len(re.findall(r"\bHGMMA\b", sass))}


def attention_jobs(quick: bool):
    import triton.language as tl
    from . import triton_attention as ta

    kernels = {"fwd": ta._attn_fwd, "dkdv": ta._attn_bwd_dkdv, "dq": ta._attn_bwd_dq}
    for stage, fn in kernels.items():
        for head_dim, tiles in ta._TILES[stage].items():
            if quick and head_dim != 64:
                continue
            for causal in ([True] if quick else [True, False]):
                for m, n, warps, stages in tiles[:1] if quick else tiles:
                    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, CAUSAL=causal,
                                      MM_DTYPE=tl.bfloat16, DOT_PRECISION="tf32",
                                      BLOCK_M=m, BLOCK_N=n)
                    label = (f"attention {stage:4s} d{head_dim} {'causal' if causal else 'full'}"
                             f" {m}x{n} w{warps} s{stages}")
                    yield label, fn, constexprs, warps, stages


def norm_jobs(quick: bool):
    from . import triton_norm as tn

    # The layouts _layout() can produce: chunk sizes never exceed the direction's MAX_BLOCK.
    for block in ([4096] if quick else [1024, 4096, 8192, 16384]):
        warps = tn._layout(block, block)[2]
        for chunked in ([False] if quick else [False, True]):
            for is_rms in ([False] if quick else [False, True]):
                flags = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, BLOCK=block, CHUNKED=chunked)
                name = f"{'rms' if is_rms else 'ln'} {block}{' chunked' if chunked else ''}"
                if block <= tn.MAX_BLOCK_FWD:
                    yield (f"norm fwd {name} w{warps}", tn._norm_fwd,
                           {**flags, "HAS_RESIDUAL": True}, warps, 1)
                if block <= tn.MAX_BLOCK_BWD:
                    yield (f"norm bwd {name} w{warps}", tn._norm_bwd,
                           {**flags, "HAS_DH": True}, warps, 1)


def report(quick: bool = False, arch: int = 90):
    """[(label, usage dict)] for every job; printed as it goes."""
    results = []
    for label, fn, constexprs, warps, stages in [*attention_jobs(quick), *norm_jobs(quick)]:
        usage = compile_kernel(fn, constexprs, warps, stages, arch=arch)
        print(f"{label:50s} regs {usage['regs']:3d}  spill {usage['spill_bytes']:5d} B  "
              f"smem {usage['smem'] // 1024:3d} KiB  hgmma {usage['hgmma']}", flush=True)
        results.append((label, usage))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one configuration per kernel")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    report(args.quick, args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

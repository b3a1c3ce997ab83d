"""Attention: the Triton kernel (interpreted on CPU, native on a GPU) against the float64
reference, forward and backward; the sdpa/torch paths; and how attention() dispatches."""
import logging
import subprocess
import sys

import pytest
import torch

import megalm_kernels as mk
from megalm_kernels import dispatch, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Allowed ‖out − ref‖ / ‖ref‖ against float64: fp32 arithmetic lands far below 1e-4; bf16
# operands (P and dS rounded to bf16 on a GPU) between 1e-3 and 1e-2.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten or NaN output)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(b, hq, hkv, t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, t, d), (b, hkv, t, d), (b, hkv, t, d), (b, hq, t, d)]
    q, k, v, do = (torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes)
    return q, k, v, do


def check_against_reference(q, k, v, do, causal, impl, tol, scale=None):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = mk.attention(*leaves, causal=causal, impl=impl, scale=scale)
    out.backward(do)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*ref_leaves, causal=causal, scale=scale)
    ref.backward(do.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {"out": rel_err(out, ref)}
    for name, mine, theirs in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        # One key and causal: softmax is constant, dq and dk are exactly zero.
        if theirs.grad.abs().max() == 0:
            assert mine.grad.abs().max() < 1e-6, name
            continue
        errors[name] = rel_err(mine.grad, theirs.grad)
    assert max(errors.values()) < tol, errors


@pytest.fixture
def poisoned(poison_outputs):
    """Every output buffer starts as NaN, so a row or column the kernels never write fails."""
    from megalm_kernels import triton_attention

    poison_outputs(triton_attention)


# (B, Hq, Hkv, T, D, causal, dtype): lengths 1, 17, 129 around the interpreter's 32/64 blocks;
# GQA (4 → 2), MQA (4 → 1), MHA; head dims 16, 24 (padded to 32), 64.
CASES = [
    (1, 4, 2, 1, 64, True, torch.float32),
    (1, 4, 2, 17, 64, True, torch.float32),
    (1, 4, 2, 17, 64, False, torch.float32),
    (1, 4, 2, 129, 64, True, torch.float32),
    (1, 4, 2, 129, 64, False, torch.float32),
    (2, 4, 1, 129, 16, True, torch.float32),
    (1, 2, 2, 129, 16, False, torch.float32),
    (1, 4, 2, 33, 24, True, torch.float32),
    (1, 4, 2, 129, 64, True, torch.bfloat16),
    (1, 4, 1, 129, 64, False, torch.bfloat16),
    (1, 2, 1, 1, 16, False, torch.bfloat16),
]


@pytest.mark.parametrize("b,hq,hkv,t,d,causal,dtype", CASES)
def test_triton_attention_matches_reference(b, hq, hkv, t, d, causal, dtype, poisoned):
    q, k, v, do = make_inputs(b, hq, hkv, t, d, dtype, seed=t * 31 + d)
    check_against_reference(q, k, v, do, causal, "triton", TOL[dtype])


def test_triton_attention_strided_inputs_and_custom_scale(poisoned):
    # Heads interleaved with time, as a (B, T, H, D) projection transposed to (B, H, T, D).
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, 33, h, 32, generator=g).to(DEVICE).transpose(1, 2)
                   for h in (4, 2, 2, 4))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, do, True, "triton", TOL[torch.float32], scale=0.3)


@pytest.mark.parametrize("impl", ["sdpa", "torch"])
def test_torch_paths_match_reference(impl):
    q, k, v, do = make_inputs(2, 4, 2, 45, 32, torch.float32, seed=3)
    check_against_reference(q, k, v, do, True, impl, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_auto_on_cpu_is_sdpa_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    q = torch.randn(1, 2, 8, 16)
    assert mk.choose("attention", "auto", q)[0] == "sdpa"
    with caplog.at_level(logging.INFO, logger="megalm.kernels"):
        mk.attention(q, q, q)
        mk.attention(q, q, q, causal=False)
    records = [r.getMessage() for r in caplog.records if r.name == "megalm.kernels"]
    assert records == ["attention: sdpa (auto on cpu: Triton kernels need CUDA; "
                       "interpreter only in tests)"]


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mk.KernelUnavailable, match="TRITON_INTERPRET=1"):
        mk.attention(*[torch.randn(1, 2, 8, 16)] * 3, impl="triton")


@pytest.mark.parametrize("impl,dtype,d,match", [
    ("triton", torch.float64, 16, "fp16/bf16/fp32"),
    ("triton", torch.float32, 512, "head dim 512"),
    ("flash", torch.float32, 16, "unknown impl"),
])
def test_unrunnable_requests_raise(impl, dtype, d, match):
    q = torch.randn(1, 2, 8, d, dtype=dtype, device=DEVICE)
    with pytest.raises((mk.KernelUnavailable, ValueError), match=match):
        mk.choose("attention", impl, q)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="multiple of Hkv"):
        mk.attention(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))


def test_triton_is_optional():
    # In a fresh interpreter: importing the package leaves triton alone, and with triton made
    # unimportable (sys.modules entry None) the torch paths run and an explicit request raises.
    code = """
import sys
import torch, megalm_kernels as mk
assert 'triton' not in sys.modules, 'import megalm_kernels imported triton'
sys.modules['triton'] = None
q = torch.randn(1, 2, 8, 16)
assert mk.attention(q, q, q).shape == q.shape
assert mk.rms_norm(q, torch.ones(16)).shape == q.shape
try:
    mk.attention(q, q, q, impl='triton')
except mk.KernelUnavailable as e:
    assert 'not installed' in str(e), e
else:
    raise SystemExit('explicit triton did not raise')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Full size, on a GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_gpu_full_size_bf16(causal, hq, hkv, poisoned):
    q, k, v, do = make_inputs(1, hq, hkv, 4096, 128, torch.bfloat16, seed=11)
    check_against_reference(q, k, v, do, causal, "triton", TOL[torch.bfloat16])


def _tile_cases():
    from megalm_kernels.dispatch import triton_installed
    if not triton_installed():
        return []
    from megalm_kernels import triton_attention as ta
    return [(stage, d, tile) for stage, per_dim in ta._TILES.items()
            for d, tiles in per_dim.items() for tile in tiles]


@pytest.mark.gpu
@pytest.mark.parametrize("stage,head_dim,tile", _tile_cases())
def test_gpu_every_autotune_tile_is_correct(stage, head_dim, tile, monkeypatch, poisoned):
    # The autotuner may pick any listed tile on some device: each one must compute the same
    # function. Force one tile for one kernel, leave the others autotuned.
    from megalm_kernels import triton_attention as ta
    kernel = {"fwd": ta._attn_fwd, "dkdv": ta._attn_bwd_dkdv, "dq": ta._attn_bwd_dq}[stage]
    m, n, warps, stages = tile
    meta = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}
    name = {"fwd": "_FWD", "dkdv": "_DKDV", "dq": "_DQ"}[stage]
    monkeypatch.setattr(ta, name, kernel)
    monkeypatch.setattr(ta, name + "_META", meta)
    q, k, v, do = make_inputs(1, 4, 2, 1000, head_dim, torch.bfloat16, seed=head_dim)
    for causal in (True, False):
        check_against_reference(q, k, v, do, causal, "triton", TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_odd_length_head_dim_256():
    q, k, v, do = make_inputs(2, 4, 2, 1000, 256, torch.bfloat16, seed=5)
    check_against_reference(q, k, v, do, True, "triton", TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert mk.choose("attention", "auto", q)[0] == "triton"

"""LayerNorm / RMSNorm: the Triton kernels (interpreted on CPU, native on a GPU) against the
float64 reference, forward and backward, with and without residual and bias; the torch path;
dispatch; and a CPU smoke run of the kernel benchmark."""
import json
import logging

import pytest
import torch

import megalm_kernels as mk
from megalm_kernels import dispatch, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Allowed ‖out − ref‖ / ‖ref‖ against float64 (observed: ~1e-7 fp32, ~4e-3 bf16).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out, ref, floor=1e-30):
    """‖out − ref‖ / ‖ref‖, with ‖ref‖ taken as at least `floor`."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten or NaN output)"
    return ((out - ref).norm() / max(ref.norm().item(), floor)).item()


def dx_scale(kind, h, weight, dy):
    """‖rstd · w · dy‖: dx is rstd · (w·dy − …), a difference of terms this large. At hidden
    size 1 they cancel to an eps-sized result, and rounding is only meaningful at their scale."""
    h, weight, dy = h.detach().double(), weight.double(), dy.double()
    centered = h if kind == "rms_norm" else h - h.mean(-1, keepdim=True)
    eps = 1e-6 if kind == "rms_norm" else 1e-5
    rstd = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    return (rstd * weight * dy).norm().item()


def run_norm(kind, impl, x, weight, bias, residual):
    if kind == "layer_norm":
        return mk.layer_norm(x, weight, bias, residual=residual, impl=impl)
    return mk.rms_norm(x, weight, residual=residual, impl=impl)


def run_reference(kind, x, weight, bias, residual):
    if kind == "layer_norm":
        return reference.layer_norm(x, weight, bias, residual=residual)
    return reference.rms_norm(x, weight, residual=residual)


def check_against_reference(kind, impl, rows, hidden, dtype, has_residual, has_bias, tol,
                            seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(DEVICE, dt)

    inputs = {
        "x": randn(rows, hidden),
        "weight": 1 + 0.5 * randn(hidden, dt=torch.float32),
        "bias": randn(hidden, dt=torch.float32) if has_bias else None,
        "residual": randn(rows, hidden) if has_residual else None,
    }
    dy, dh = randn(rows, hidden), randn(rows, hidden)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    ref_leaves = {k: v.double().requires_grad_() for k, v in inputs.items() if v is not None}

    def backward(outputs, dy, dh):
        if has_residual:
            y, h = outputs
            (y * dy).sum().add((h * dh).sum()).backward()
            return y, h
        (outputs * dy).sum().backward()
        return outputs, None

    args = [leaves.get(k) for k in ("x", "weight", "bias", "residual")]
    y, h = backward(run_norm(kind, impl, *args), dy, dh)
    ref_args = [ref_leaves.get(k) for k in ("x", "weight", "bias", "residual")]
    y_ref, h_ref = backward(run_reference(kind, *ref_args), dy.double(), dh.double())

    assert y.dtype == dtype and y.shape == inputs["x"].shape
    errors = {"y": rel_err(y, y_ref)}
    if has_residual:
        errors["h"] = rel_err(h, h_ref)
    h_in = inputs["x"] if h_ref is None else h_ref
    for name in leaves:
        floor = dx_scale(kind, h_in, inputs["weight"], dy) if name in ("x", "residual") else 1e-30
        errors["d" + name] = rel_err(leaves[name].grad, ref_leaves[name].grad, floor)
    assert max(errors.values()) < tol, errors


@pytest.fixture
def poisoned(poison_outputs):
    """Every output buffer starts as NaN, so a row the kernels never write fails."""
    from megalm_kernels import triton_norm

    poison_outputs(triton_norm)


# (kind, hidden, dtype, residual, bias). Hidden 3000 takes the chunked path under the
# interpreter (rows longer than 1024); 1 and 300 the in-register one.
CASES = [
    *[("layer_norm", n, torch.float32, r, b) for n in (1, 300, 3000)
      for r, b in ((False, False), (True, True))],
    ("layer_norm", 300, torch.float32, False, True),
    ("layer_norm", 300, torch.float32, True, False),
    *[("rms_norm", n, torch.float32, r, False) for n in (1, 300, 3000) for r in (False, True)],
    ("layer_norm", 300, torch.bfloat16, True, True),
    ("layer_norm", 3000, torch.bfloat16, False, True),
    ("rms_norm", 3000, torch.bfloat16, True, False),
]


@pytest.mark.parametrize("kind,hidden,dtype,residual,bias", CASES)
def test_triton_norm_matches_reference(kind, hidden, dtype, residual, bias, poisoned):
    # 6 rows over the interpreter's 4 backward programs: some take two rows, one takes none.
    rows = 6 if hidden < 1000 else 5
    check_against_reference(kind, "triton", rows, hidden, dtype, residual, bias, TOL[dtype],
                            seed=hidden)


def test_triton_norm_keeps_leading_dims(poisoned):
    x = torch.randn(2, 3, 40, device=DEVICE)
    y, h = mk.layer_norm(x, torch.ones(40, device=DEVICE), None, residual=x, impl="triton")
    assert y.shape == h.shape == x.shape
    torch.testing.assert_close(h, 2 * x)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual", [False, True])
def test_torch_path_matches_reference(kind, residual):
    check_against_reference(kind, "torch", 7, 96, torch.float32, residual, kind == "layer_norm",
                            TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_auto_on_cpu_is_torch_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    x, w = torch.randn(4, 32), torch.ones(32)
    with caplog.at_level(logging.INFO, logger="megalm.kernels"):
        for _ in range(3):
            mk.layer_norm(x, w, None)
            mk.rms_norm(x, w, residual=x)
    records = [r.getMessage() for r in caplog.records if r.name == "megalm.kernels"]
    reason = "(auto on cpu: Triton kernels need CUDA; interpreter only in tests)"
    assert records == [f"layer_norm: torch {reason}", f"rms_norm: torch {reason}"]


@pytest.mark.parametrize("op,impl,match", [
    ("layer_norm", "cuda", "needs a CUDA tensor"),
    ("layer_norm", "apex", "NVIDIA Apex"),
    ("rms_norm", "apex", "NVIDIA Apex"),
    ("rms_norm", "cuda", "unknown impl"),
])
def test_unavailable_impls_raise_on_cpu(op, impl, match):
    with pytest.raises((mk.KernelUnavailable, ValueError), match=match):
        mk.choose(op, impl, torch.randn(4, 32))


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mk.KernelUnavailable, match="TRITON_INTERPRET=1"):
        mk.rms_norm(torch.randn(4, 32), torch.ones(32), impl="triton")


# ---------------------------------------------------------------------------------------------
# Benchmark smoke test (CPU, torch paths, tiny shapes)
# ---------------------------------------------------------------------------------------------

def test_benchmark_quick_writes_results(tmp_path):
    from megalm_kernels import bench

    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["meta"]["quick"] is True and result["meta"]["device"]
    rows = result["rows"]
    assert {r["op"] for r in rows} >= {"attention", "layer_norm", "rms_norm"}
    assert all(r["ms"] > 0 and r["rate"] > 0 for r in rows)
    assert (tmp_path / "kernels.md").read_text().count("\n") > len(rows)
    assert (tmp_path / "kernels.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Full size, on a GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("hidden", [4096, 12288, 65536])
def test_gpu_full_size_bf16(kind, hidden, poisoned):
    check_against_reference(kind, "triton", 64, hidden, torch.bfloat16, True,
                            kind == "layer_norm", TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    assert mk.choose("rms_norm", "auto", torch.randn(4, 64, device="cuda"))[0] == "triton"

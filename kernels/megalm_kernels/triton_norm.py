"""LayerNorm and RMSNorm in Triton, forward and backward, optionally fused with a residual add.

One program normalizes one row in the forward pass. Rows up to MAX_BLOCK_FWD/BWD elements stay
in registers (one read, one write); longer rows (65536 and beyond) are walked in chunks, three
times in the forward (mean, variance, output) and twice in the backward, the re-reads mostly from
L2. Statistics are fp32 whatever the input dtype.

With `residual`, h = x + residual is rounded to the activations' dtype, written out, and
normalized: the same numbers eager `norm(x + residual)` produces, in one pass instead of three.

Backward: each program takes a contiguous run of rows, writes dx, and keeps its partial sums of
dweight/dbias (fp32); a torch sum over the few hundred partial rows finishes them. No atomics,
so gradients are deterministic.
"""
import functools

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .norm_autograd import NormKernels, fused_norm

# Longest row held in registers. Forward: 16384 fp32 values over 16 warps, 32 per thread.
# Backward holds five such arrays (x, dy, w, dw, db) and spills past 8192 (sm_90 compile report,
# megalm's benchmarks/NOTES-kernels.md). Under the interpreter a small limit sends "a few
# thousand" hidden sizes down the chunked path in tests.
MAX_BLOCK_FWD = 1024 if interpreting() else 16384
MAX_BLOCK_BWD = 1024 if interpreting() else 8192


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_h(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """The row to normalize, in fp32: x, or x + residual rounded to the stored dtype."""
    h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = h + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
        h_out = h.to(h_row.dtype.element_ty)
        if STORE_H:
            tl.store(h_row + cols, h_out, mask=mask)
        h = h_out.to(tl.float32)
    return h


@triton.jit
def _write_y(y_row, W, B, h, mean, rstd, cols, mask, HAS_BIAS: tl.constexpr):
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (h - mean) * rstd * w
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + cols, y.to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd(X, R, H_OUT, Y, W, B, MEAN, RSTD, stride_x, stride_r, stride_h, stride_y, N, eps,
              IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    h_row = H_OUT + row * stride_h
    y_row = Y + row * stride_y
    if not CHUNKED:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = _load_h(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL, True)
        mean = 0.0
        if not IS_RMS:
            mean = tl.sum(h, 0) / N
        centered = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, 0) / N + eps)
        _write_y(y_row, W, B, h, mean, rstd, cols, mask, HAS_BIAS)
    else:
        # Two statistics passes (mean, then centred variance: no cancellation), then the output.
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                acc += _load_h(x_row, r_row, h_row, cols, cols < N, HAS_RESIDUAL, True)
            mean = tl.sum(acc, 0) / N
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            # RMSNorm has no mean pass, so h is written here instead.
            h = _load_h(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL, IS_RMS)
            centered = tl.where(mask, h - mean, 0.0)
            acc += centered * centered
        rstd = tl.rsqrt(tl.sum(acc, 0) / N + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            h = _load_h(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL, False)
            _write_y(y_row, W, B, h, mean, rstd, cols, mask, HAS_BIAS)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_stats(MEAN, RSTD, row, IS_RMS: tl.constexpr):
    """(mean, rstd) the forward pass saved for this row; RMSNorm's mean is 0."""
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(MEAN + row)
    return mean, tl.load(RSTD + row)


@triton.jit
def _x_hat_dy(x_row, dy_row, cols, mask, mean, rstd):
    """x̂ = (x − mean) · rstd (0 past the row's end) and dy, in fp32."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (x - mean) * rstd, 0.0), dy


@triton.jit
def _write_dx(dx_row, dh_row, x_hat, wdy, c_xw, c_w, rstd, cols, mask, IS_RMS: tl.constexpr,
              HAS_DH: tl.constexpr):
    """Store dx = rstd · (w·dy − x̂·c_xw − c_w) [+ dh], given the row's means c_xw = mean(x̂·w·dy)
    and c_w = mean(w·dy) (ignored for RMSNorm)."""
    dx = wdy - x_hat * c_xw
    if not IS_RMS:
        dx = dx - c_w
    dx = dx * rstd
    if HAS_DH:
        dx += tl.load(dh_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_row + cols, dx.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, X, W, MEAN, RSTD, DH, DX, DW_PART, DB_PART,
              stride_dy, stride_x, stride_dh, stride_dx, M, N, rows_per_program,
              IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
              BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    """dx = rstd · (w·dy − x̂·mean(w·dy·x̂) − mean(w·dy)) [+ dh]; the last mean is LayerNorm's
    only; dw += dy·x̂, db += dy for this program's rows."""
    pid = tl.program_id(0)
    # int64 row bounds make the loop index int64, so row * stride cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
    if not CHUNKED:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], tl.float32)
        db = tl.zeros([BLOCK], tl.float32)
        for row in range(row_start, row_end):
            mean, rstd = _row_stats(MEAN, RSTD, row, IS_RMS)
            x_hat, dy = _x_hat_dy(X + row * stride_x, DY + row * stride_dy, cols, mask, mean, rstd)
            wdy = w * dy
            _write_dx(DX + row * stride_dx, DH + row * stride_dh, x_hat, wdy,
                      tl.sum(x_hat * wdy, 0) / N, tl.sum(wdy, 0) / N, rstd, cols, mask, IS_RMS,
                      HAS_DH)
            dw += dy * x_hat
            db += dy
        tl.store(DW_PART + part + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PART + part + cols, db, mask=mask)
    else:
        # Per row: one pass for the two means, one to write dx and add to the partial sums.
        for row in range(row_start, row_end):
            mean, rstd = _row_stats(MEAN, RSTD, row, IS_RMS)
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            acc_xw = tl.zeros([BLOCK], tl.float32)
            acc_w = tl.zeros([BLOCK], tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x_hat, dy = _x_hat_dy(x_row, dy_row, cols, mask, mean, rstd)
                wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                acc_xw += x_hat * wdy
                acc_w += wdy
            c_xw = tl.sum(acc_xw, 0) / N
            c_w = tl.sum(acc_w, 0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x_hat, dy = _x_hat_dy(x_row, dy_row, cols, mask, mean, rstd)
                wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                _write_dx(DX + row * stride_dx, DH + row * stride_dh, x_hat, wdy, c_xw, c_w, rstd,
                          cols, mask, IS_RMS, HAS_DH)
                # This program alone owns its partial row (zero-initialized): plain loads and
                # stores, far cheaper than atomics.
                dw = tl.load(DW_PART + part + cols, mask=mask, other=0.0)
                tl.store(DW_PART + part + cols, dw + dy * x_hat, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_PART + part + cols, mask=mask, other=0.0)
                    tl.store(DB_PART + part + cols, db + dy, mask=mask)
            # The next row reads these partial sums back, possibly from other threads.
            tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _alloc(shape, like, dtype=None):
    """Output buffers; a test may swap this for a NaN-filled allocator to catch unwritten rows."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _layout(n: int, max_block: int):
    """(BLOCK, CHUNKED, num_warps) for rows of n elements: about 8 fp32 values per thread."""
    block = min(triton.next_power_of_2(n), max_block)
    chunked = n > block
    return block, chunked, min(16, max(1, block // 256))


@functools.cache
def _backward_programs(device: torch.device) -> int:
    # Two programs per SM keep every SM busy while the partial dweight buffer stays small.
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows(t, n):
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, weight, bias, residual, eps: float, is_rms: bool):
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    m = x2.shape[0]
    y = _alloc((m, n), x)
    h = _alloc((m, n), x) if residual is not None else x2
    mean = _alloc((m,), x, torch.float32)
    rstd = _alloc((m,), x, torch.float32)
    block, chunked, warps = _layout(n, MAX_BLOCK_FWD)
    if m > 0:
        _norm_fwd[(m,)](x2, r2, h, y, weight, bias if bias is not None else weight, mean, rstd,
                        x2.stride(0), r2.stride(0), h.stride(0), y.stride(0), n, eps,
                        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
                        HAS_BIAS=bias is not None, BLOCK=block, CHUNKED=chunked,
                        num_warps=warps)
    return y.view(x.shape), h, mean, rstd


def _backward(dy, x2, weight, mean, rstd, dh, has_bias: bool, is_rms: bool):
    m, n = x2.shape
    dy2 = _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    dx = _alloc((m, n), x2)
    block, chunked, warps = _layout(n, MAX_BLOCK_BWD)
    rows_per_program = triton.cdiv(max(m, 1), _backward_programs(x2.device))
    programs = triton.cdiv(m, rows_per_program)
    # Chunked rows add into their partial row, so it must start at zero.
    make = torch.zeros if chunked else torch.empty
    dw_part = make((programs, n), device=x2.device, dtype=torch.float32)
    db_part = make((programs, n), device=x2.device, dtype=torch.float32) if has_bias else dw_part
    if m > 0:
        _norm_bwd[(programs,)](dy2, x2, weight, mean, rstd, dh2, dx, dw_part, db_part,
                               dy2.stride(0), x2.stride(0), dh2.stride(0), dx.stride(0), m, n,
                               rows_per_program, IS_RMS=is_rms, HAS_BIAS=has_bias,
                               HAS_DH=dh is not None, BLOCK=block, CHUNKED=chunked,
                               num_warps=warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db


LAYER_NORM = NormKernels(functools.partial(_forward, is_rms=False),
                         functools.partial(_backward, is_rms=False))
RMS_NORM = NormKernels(functools.partial(_forward, is_rms=True),
                       functools.partial(_backward, is_rms=True))


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None):
    """Triton LayerNorm over the last dim; with residual returns (y, x + residual)."""
    return fused_norm(LAYER_NORM, x, weight, bias, eps, residual)


def rms_norm(x, weight, eps: float = 1e-6, *, residual=None):
    """Triton RMSNorm over the last dim; with residual returns (y, x + residual)."""
    return fused_norm(RMS_NORM, x, weight, None, eps, residual)

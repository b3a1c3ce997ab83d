"""Flash attention in Triton: forward and backward as one autograd Function.

Layout: q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq % Hkv == 0. Grouped-query and multi-query
attention read K/V of head h // (Hq / Hkv) directly; nothing is repeated in memory. Any T works
(boundary rows and columns are masked), any D up to 256 (padded to a power of two, at least 16,
with masked loads). Inputs may be bf16, fp16 or fp32; scores, softmax statistics and all
accumulators are fp32.

Forward saves the row-wise log-sum-exp (base 2) so backward can rebuild the probabilities
block by block without storing the T×T matrix. Backward runs three kernels:
  delta = rowsum(dO ∘ O); dK, dV per key block (looping over the query heads of its group, so
  GQA needs no atomics); dQ per query block. Splitting dQ from dK/dV recomputes q·kᵀ once more
  but keeps every gradient deterministic.

On a GPU each kernel's block sizes come from `triton.autotune` (per sequence length, head dim,
causality and dtype); under TRITON_INTERPRET=1 one small fixed configuration keeps CPU tests fast
while still exercising the uneven-block paths.
"""
import torch
import triton
import triton.language as tl

from .dispatch import interpreting

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Helpers (Triton inlines them on a GPU; under the interpreter each call costs ~0.15 ms, so they
# stay out of the innermost arithmetic)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(base, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows × cols) tile. Padded head-dim columns read 0, and so do rows past n_rows with
    MASK_ROWS (blocks wholly inside the sequence skip that check)."""
    ok = cols[None, :] < HEAD_DIM
    if MASK_ROWS:
        ok = ok & (rows[:, None] < n_rows)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=ok, other=0.0)


@triton.jit
def _store_rows(base, value, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr):
    tl.store(base + rows[:, None] * stride_row + cols[None, :], value.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _query_program(H, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(start_m, bh, b, h, h_kv): this program's query block, and its batch and heads (int64;
    bh = b·H + h indexes the per-row statistics)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Late query blocks see the most keys: start them first so the tail of the grid is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    h = bh % H
    return (pid_m * BLOCK_M, bh.to(tl.int64), (bh // H).to(tl.int64), h.to(tl.int64),
            (h // GROUP).to(tl.int64))


@triton.jit
def _key_ranges(start_m, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_hi, mask_hi): the query block at start_m sees keys [0, full_hi) whole and
    [full_hi, mask_hi) only through the mask."""
    if CAUSAL:
        # Keys before the query block are all visible; the diagonal block needs the mask.
        # BLOCK_M % BLOCK_N == 0 keeps start_m on a key-block boundary.
        full_hi = start_m
        mask_hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        mask_hi = T
    return full_hi, mask_hi


@triton.jit
def _keys_visible(offs_m, offs_n, T, CAUSAL: tl.constexpr):
    """(queries × keys) mask of a masked key block: keys before T and, causal, not after the
    query."""
    visible = offs_n[None, :] < T
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return visible


# MM_DTYPE, the dtype of matrix-product operands, is the input dtype on a GPU (so P and dS are
# rounded to bf16/fp16 before their products, as in FlashAttention) and fp32 under the
# interpreter, whose tl.dot multiplies bf16 operands as raw 16-bit integers (Triton 3.9).


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi,
                T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                MASKED: tl.constexpr, MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED only for the diagonal and the tail."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        v = _load_rows(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            s = tl.where(_keys_visible(offs_m, offs_n, T, CAUSAL), s, float("-inf"))
        # Every row has a finite maximum by now: key 0 (or key start_m on the diagonal) is always
        # valid and is visited first, so exp2(-inf - m) is a clean 0, never NaN. Rows past T
        # are computed but never stored.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(MM_DTYPE), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, GROUP, T, qk_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
              MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h, h_kv = _query_program(H, GROUP, BLOCK_M, CAUSAL)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, T, HEAD_DIM,
                   True).to(MM_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    full_hi, mask_hi = _key_ranges(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                offs_d, 0, full_hi, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL,
                                False, MM_DTYPE, DOT_PRECISION)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                offs_d, full_hi, mask_hi, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL,
                                True, MM_DTYPE, DOT_PRECISION)

    _store_rows(O + b * stride_ob + h * stride_oh, acc / l_i[:, None], offs_m, stride_ot, offs_d,
                T, HEAD_DIM)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh,
                    stride_dot, H, T, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta_i = Σ_d dO_id · O_id: the softmax-Jacobian term shared by dK and dQ."""
    start_m, bh, b, h, _ = _query_program(H, 1, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_d, T, HEAD_DIM,
                   True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, T,
                    HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                 offs_n, offs_d, lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                 MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), working transposed
    (keys × queries) so both products land in the key block's rows without a transpose."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qt, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        do = _load_rows(do_base, offs_m, stride_dot, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            # Padded query rows would add to real keys' gradients here: mask them too.
            valid = offs_m[None, :] < T
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        dv = tl.dot(p_t.to(MM_DTYPE), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(MM_DTYPE), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   H, H_KV, GROUP, T, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh_kv = tl.program_id(1)
    b = (bh_kv // H_KV).to(tl.int64)
    h_kv = bh_kv % H_KV
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_rows(K + b * stride_kb + h_kv.to(tl.int64) * stride_kh, offs_n, stride_kt, offs_d,
                   T, HEAD_DIM, True).to(MM_DTYPE)
    v = _load_rows(V + b * stride_vb + h_kv.to(tl.int64) * stride_vh, offs_n, stride_vt, offs_d,
                   T, HEAD_DIM, True).to(MM_DTYPE)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    # Query blocks: the diagonal (causal only, masked), then full blocks, then the masked tail.
    # BLOCK_N % BLOCK_M == 0 keeps start_n + BLOCK_N on a query-block boundary.
    if CAUSAL:
        lo = start_n + BLOCK_N
    else:
        lo = 0
    full_hi = tl.maximum(lo, (T // BLOCK_M) * BLOCK_M)
    for g in range(0, GROUP):
        h = (h_kv * GROUP + g).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        if CAUSAL:
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                  stride_dot, offs_n, offs_d, start_n,
                                  tl.minimum(start_n + BLOCK_N, T), T, qk_scale, HEAD_DIM,
                                  BLOCK_M, CAUSAL, True, MM_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                              stride_dot, offs_n, offs_d, lo, full_hi, T, qk_scale, HEAD_DIM,
                              BLOCK_M, CAUSAL, False, MM_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                              stride_dot, offs_n, offs_d, full_hi, T, T, qk_scale, HEAD_DIM,
                              BLOCK_M, CAUSAL, True, MM_DTYPE, DOT_PRECISION)

    _store_rows(DK + b * stride_dkb + h_kv.to(tl.int64) * stride_dkh, dk * sm_scale, offs_n,
                stride_dkt, offs_d, T, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + h_kv.to(tl.int64) * stride_dvh, dv, offs_n, stride_dvt,
                offs_d, T, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
               lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, MM_DTYPE: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        v = _load_rows(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, MASKED).to(MM_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_keys_visible(offs_m, offs_n, T, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(MM_DTYPE), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, GROUP, T, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                 MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h, h_kv = _query_program(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, T, HEAD_DIM,
                   True).to(MM_DTYPE)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, T,
                    HEAD_DIM, True).to(MM_DTYPE)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    full_hi, mask_hi = _key_ranges(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                    0, full_hi, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, MM_DTYPE,
                    DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                    full_hi, mask_hi, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, MM_DTYPE,
                    DOT_PRECISION)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m, stride_dqt, offs_d,
                T, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per padded head dim. Picked from sm_90 compile
# reports (registers, spills, shared memory; see megalm's benchmarks/NOTES-kernels.md): none
# spills more than ~100 bytes and all fit in 227 KiB of shared memory. Forward and dQ need
# BLOCK_M % BLOCK_N == 0, dK/dV BLOCK_N % BLOCK_M == 0 (causal diagonal alignment).
_TILES = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        256: [(64, 32, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
    },
    "dkdv": {
        64: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 3)],
        128: [(16, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2), (16, 32, 4, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2)],
    },
    "dq": {
        64: [(128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
        128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2), (128, 16, 8, 2)],
    },
}


def _tile(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _pruner(stage):
    def prune(configs, named_args, **kwargs):
        # Only the tiles listed for this head dim, and none wider than the (padded) sequence.
        args = {**named_args, **kwargs}
        wanted = _TILES[stage][min(max(args["HEAD_DIM_PAD"], 64), 256)]
        seq = max(16, triton.next_power_of_2(args["T"]))
        kept = [c for c in configs if _tile(c) in wanted and max(_tile(c)[:2]) <= seq]
        smallest = min(wanted, key=lambda t: t[0] * t[1])
        return kept or [c for c in configs if _tile(c) == smallest]
    return prune


def _all_configs(stage):
    tiles = sorted({t for per_dim in _TILES[stage].values() for t in per_dim})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


_TUNING_KEY = ["T", "HEAD_DIM_PAD", "CAUSAL"]

# Under the interpreter: small blocks, and unequal ones so the diagonal spans several
# sub-blocks as it does with the large GPU tiles.
_INTERPRETER_META = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32},
}


def _launcher(kernel, stage):
    """(kernel to launch, extra meta-parameters): autotuned on a GPU, fixed when interpreted."""
    if interpreting():
        return kernel, _INTERPRETER_META[stage]
    tuned = triton.autotune(configs=_all_configs(stage), key=_TUNING_KEY,
                            prune_configs_by={"early_config_prune": _pruner(stage)})(kernel)
    return tuned, {}


_FWD, _FWD_META = _launcher(_attn_fwd, "fwd")
_DKDV, _DKDV_META = _launcher(_attn_bwd_dkdv, "dkdv")
_DQ, _DQ_META = _launcher(_attn_bwd_dq, "dq")
_DELTA_BLOCK = 64


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _alloc(shape, like, dtype=None):
    """Output buffers; a test may swap this for a NaN-filled allocator to catch unwritten rows."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _dot_precision(dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: tf32 only where the user allowed it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _mm_dtype(dtype):
    return tl.float32 if interpreting() else _TL_DTYPES[dtype]


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, causal: bool, scale: float):
    B, H, T, D = q.shape
    o = _alloc(q.shape, q)
    lse = _alloc((B, H, T), q, torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _FWD[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
               H, H // k.shape[1], T, scale * LOG2E,
               HEAD_DIM=D, HEAD_DIM_PAD=_head_dim_pad(D), CAUSAL=causal,
               MM_DTYPE=_mm_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype),
               **_FWD_META)
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, scale: float):
    B, H, T, D = q.shape
    H_KV = k.shape[1]
    pad = _head_dim_pad(D)
    precision = _dot_precision(q.dtype)
    delta = _alloc((B, H, T), q, torch.float32)
    _attn_bwd_delta[(triton.cdiv(T, _DELTA_BLOCK), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T,
        HEAD_DIM=D, HEAD_DIM_PAD=pad, BLOCK_M=_DELTA_BLOCK)

    dk, dv = _alloc(k.shape, k), _alloc(v.shape, v)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_KV)  # noqa: E731
    _DKDV[grid](q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
                *_strides(do), *_strides(dk), *_strides(dv), H, H_KV, H // H_KV, T,
                scale * LOG2E, scale, HEAD_DIM=D, HEAD_DIM_PAD=pad, CAUSAL=causal,
                MM_DTYPE=_mm_dtype(q.dtype), DOT_PRECISION=precision, **_DKDV_META)

    dq = _alloc(q.shape, q)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _DQ[grid](q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v),
              *_strides(do), *_strides(dq), H, H // H_KV, T, scale * LOG2E, scale,
              HEAD_DIM=D, HEAD_DIM_PAD=pad, CAUSAL=causal, MM_DTYPE=_mm_dtype(q.dtype),
              DOT_PRECISION=precision, **_DQ_META)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Exact attention without the T×T matrix; saves (q, k, v, o, lse) for backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_stride(do), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, *, causal: bool = True, scale: float | None = None):
    """Triton flash attention; q (B, Hq, T, D), k/v (B, Hkv, T, D) → (B, Hq, T, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, causal, scale)

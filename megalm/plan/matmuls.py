"""The matmuls of one micro-batch on one tensor rank, and the share of the GPU's peak each reaches from its
shape (m, n, k): C (m x n) = A (m x k) · B (k x n).

The share is a roofline over the matmul's arithmetic intensity (FLOPs per byte of A, B and C, each
moved once), times what a matmul keeps of it inside a training step:

    share(m, n, k) = SUSTAINED_SHARE x min(MAMF share, intensity x memory bandwidth x HBM_SHARE / peak)

The MAMF share (best-shaped matmul / dense peak) and the memory bandwidth are per GPU
(``hardware.GPUS``; MAMF from S. Bekman's ml-engineering, bandwidth from the datasheets). In bf16, with
SUSTAINED_SHARE applied:

    intensity (FLOP/byte)      32     64    128    256    512+   (the q/k/v, output, MLP and head matmuls
    A100 80GB (312 TFLOP/s)   0.14   0.27   0.54   0.62   0.62    of GPT models have ~500-5000; the
    H100 SXM (989 TFLOP/s)    0.07   0.14   0.28   0.56   0.58    attention core's about head_dim)

Each block runs q, k/v, the attention core (scores q·kᵀ and mix p·v, per head and sequence), the
attention output and the MLP's up and down projections; the last stage adds the LM head. Backward
runs, for each C = A·B, the two gradient matmuls dA = dC·Bᵀ (m, k, n) and dB = Aᵀ·dC (k, n, m).
The attention core is timed as its two matmuls with the scores written and read once, whichever
kernel runs it: a flash kernel keeps them on chip but reaches about the same share (FlashAttention-2:
50-73% of an A100's peak; this gives head_dim 128 at sequence 2048 0.48 there). A causal flash kernel skips half of
the scores, which this counts in full, as the FLOP count (and MFU) does.

Refreshing the table from measurements: ``benchmarks/results/<device>/kernels*.json`` (python -m
megalm_kernels.bench, benchmarks/run_gpu_kernels.sh) records ``meta.ceilings.matmul_bf16_tflops``, an
8192^3 bf16 matmul: divided by the device's peak it replaces that GPU's MAMF share; its attention rows
(TFLOP/s by sequence and head_dim, forward and backward) would replace the roofline's share for the
attention core; its copy ceiling, HBM_SHARE. The results committed so far hold no GPU run (only
benchmarks/results/cpu-x86-64, without kernels.json), so nothing here comes from them yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import ModelConfig
from megalm.plan.hardware import GPU, HBM_SHARE

# The share of the roofline a matmul keeps inside a training step (clocks held at the power limit, caches
# shared with the kernels around it, the gaps between kernels, 2021's cuBLAS against 2024's MAMF). Fitted,
# the one fitted number of the step time: the value that makes the largest error over the ten runs of
# Narayanan et al. 2021, Table 1 (megalm/plan/published.py) smallest, to two digits (+6.0% to -6.5%; 0.69
# to 0.75 keep every run within 10%; at 1.0 the runs come out 16-37% too fast).
SUSTAINED_SHARE = 0.72


@dataclass(frozen=True)
class Matmul:
    name: str
    m: int
    n: int
    k: int
    count: int  # how many of them one micro-batch runs (heads x sequences for the attention core)

    @property
    def flops(self) -> float:
        return 2 * self.m * self.n * self.k * self.count

    def gradients(self) -> list[Matmul]:
        """The backward's two matmuls: dA = dC·Bᵀ and dB = Aᵀ·dC."""
        return [Matmul(f"{self.name}: input gradient", self.m, self.k, self.n, self.count),
                Matmul(f"{self.name}: weight gradient", self.k, self.n, self.m, self.count)]


def block_matmuls(m: ModelConfig, micro_batch: int, seq: int, tp: int, cp: int = 1) -> list[Matmul]:
    """One block's forward matmuls on one tensor rank (key/value heads fewer than tp ranks are whole on each;
    with sequence parallelism the projections still see the gathered sequence; with context parallelism
    they see 1/cp of it, and the attention core the whole sequence of 1/cp of the heads)."""
    tokens, d, hd = micro_batch * seq // cp, m.d_model, m.head_dim
    heads, kv = m.n_heads // tp, (m.kv_heads // tp if m.kv_heads % tp == 0 else 1)
    up = m.ffn_dim * (2 if m.style == "llama" else 1)
    return [Matmul("q", tokens, heads * hd, d, 1), Matmul("k, v", tokens, 2 * kv * hd, d, 1),
            Matmul("attention scores", seq, seq, hd, heads // cp * micro_batch),
            Matmul("attention mix", seq, hd, seq, heads // cp * micro_batch),
            Matmul("attention output", tokens, d, heads * hd, 1),
            Matmul("MLP up", tokens, up // tp, d, 1), Matmul("MLP down", tokens, d, m.ffn_dim // tp, 1)]


def head_matmul(m: ModelConfig, micro_batch: int, seq: int, tp: int, cp: int = 1) -> Matmul:
    """The LM head (a classifier's head over its labels), this rank's slice of the vocabulary."""
    return Matmul("LM head", micro_batch * seq // cp, (len(m.labels) or m.vocab_size) // tp, m.d_model, 1)


def share(gpu: GPU, mm: Matmul, precision: str, element_bytes: int) -> float:
    """The share of ``gpu``'s dense peak that ``mm`` reaches (the module's roofline; fp32 takes bf16's shares)."""
    moved = element_bytes * (mm.m * mm.k + mm.k * mm.n + mm.m * mm.n)
    intensity = 2 * mm.m * mm.n * mm.k / moved
    peak = gpu.peak_tflops(precision) * 1e12
    return SUSTAINED_SHARE * min(gpu.mamf_share, intensity * gpu.hbm_tbs * 1e12 * HBM_SHARE / peak)

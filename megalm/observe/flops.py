"""What a token costs and what share of the GPU's peak a run reaches: FLOPs per token from the
model config, the dense peaks of known GPUs, and MFU.

Training FLOPs per token are 3 × the forward's (the backward computes gradients for both inputs
and weights: 2 × forward). The forward, per token:

- each block's matmuls, 2 FLOPs per weight: the query/key/value projections ``d · (d + 2·kv·hd)``,
  the output projection ``d²``, the MLP ``2·d·ff`` (GPT-2) or ``3·d·ff`` (SwiGLU);
- each block's attention, ``2 · 2 · seq · d``: scores ``QKᵀ`` and mixing ``AV`` over the full
  ``seq × seq`` matrix, as PaLM and Megatron-LM count it (a causal kernel skips half of it, so MFU
  compares runs, not kernels' raw efficiency);
- the LM head, ``2 · d · vocab`` (a classifier's head, ``2 · d · labels``, at every position).

Norms, biases, softmax and the embedding lookup are left out (under 1% at any real size). The
formula is checked against torch's FLOP counter on the model itself (tests/test_observe.py).

MFU divides the achieved model FLOP/s per GPU by the dense peak of the GPU for the run's precision:
from the table below for a recognised device, from ``train.peak_tflops`` when set, otherwise none
— never a guess (a CPU has no MFU).
"""

from __future__ import annotations

from megalm.config import ModelConfig

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (bf16 tensor core, fp32 without tensor cores).
# Names are matched against torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),  # SXM
    ("H200", 989.4, 66.9),
    ("B200", 2250.0, 80.0),  # HGX, 1000 W
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
]


def flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token of a ``seq_len`` sequence."""
    d, hd, kv = m.d_model, m.head_dim, m.kv_heads
    mlp = (2 if m.style == "gpt2" else 3) * d * m.ffn_dim
    block = 2 * (d * (d + 2 * kv * hd) + d * d + mlp) + 2 * 2 * seq_len * d
    forward = m.n_layers * block + 2 * d * (len(m.labels) or m.vocab_size)
    return 3 * forward


def peak_tflops(device_name: str, precision: str, override: float = 0.0) -> float | None:
    """The dense peak TFLOP/s of ``device_name`` at ``precision`` (bf16 or fp32); ``override`` if set;
    None for a device not in the table (and for CPUs)."""
    if override:
        return override
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name in device_name:
            return bf16 if precision == "bf16" else fp32
    return None


def mfu(tflops_per_gpu: float, peak: float | None) -> float | None:
    return None if peak is None else tflops_per_gpu / peak

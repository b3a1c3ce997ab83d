"""Pure-torch references for the fused kernels: the definitions the fast versions must match.

Written for clarity, not speed: attention materializes the full score matrix and repeats K/V for
grouped-query attention. Everything is computed in float32, or float64 when the inputs are float64
(how the tests call it), and returned in the input dtype.
"""
import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention(q, k, v, *, causal: bool = True, scale: float | None = None):
    """softmax(q kᵀ · scale [+ causal mask]) v for q (B, Hq, T, D) and k, v (B, Hkv, T, D)."""
    dt = _compute_dtype(q)
    group = q.shape[1] // k.shape[1]
    q32 = q.to(dt)
    k32 = k.to(dt).repeat_interleave(group, dim=1)
    v32 = v.to(dt).repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q32 @ k32.transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = scores.shape[-2:]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v32).to(q.dtype)


def _add_residual(x, residual):
    # The sum is rounded to the activations' dtype before normalizing, as eager torch does;
    # the fused kernels reproduce exactly this.
    return x if residual is None else x + residual


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None):
    """(h - mean) / sqrt(var + eps) * weight + bias over the last dim, h = x (+ residual)."""
    h = _add_residual(x, residual)
    dt = _compute_dtype(h)
    h32 = h.to(dt)
    mean = h32.mean(-1, keepdim=True)
    var = (h32 - mean).pow(2).mean(-1, keepdim=True)
    y = (h32 - mean) * torch.rsqrt(var + eps) * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps: float = 1e-6, *, residual=None):
    """h / sqrt(mean(h²) + eps) * weight over the last dim, h = x (+ residual)."""
    h = _add_residual(x, residual)
    dt = _compute_dtype(h)
    h32 = h.to(dt)
    y = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)

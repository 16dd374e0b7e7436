"""Plain-PyTorch attention with per-query entropy: the reference beside the Triton kernel.

Streams over key chunks with the online-softmax recurrence of FlashAttention (running max m,
exp-sum l, output accumulator) plus a third running sum for the entropy, so memory stays
O(Lq · chunk) per (batch, head) instead of O(Lq · Lk). Entropy in nats:

    H = log l - Σ_j p̃_j (s_j - m) / l,   p̃_j = exp(s_j - m),  s_j = scale · q·k_j

The shifted sum Σ p̃ (s - m) ≤ 0 keeps sharp rows (H → 0) accurate; when m grows from m_old
to m_new the old sums rescale by α = exp(m_old - m_new) and the shifted sum also gains
l_old · (m_old - m_new). Computes in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_entropy_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """`(out like q, entropy (B, H, Lq) float32)`; `q (B,H,Lq,D)`, `k, v (B,H,Lk,D)`, no mask."""
    with torch.autocast(q.device.type, enabled=False):  # a reference: never lowered by autocast
        return _reference(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale), chunk)


def entropy_reference(q: Tensor, k: Tensor, scale: float | None = None, chunk: int = 1024) -> Tensor:
    """The entropy alone, `(B, H, Lq)` float32: the same streaming pass with no V (no P·V, no
    output), bit for bit `attention_entropy_reference`'s entropy. Beside an attention that already
    ran (`toprovar.kernels.sdpa_entropy` on CPU) it costs one q·kᵀ and one exp per score."""
    with torch.autocast(q.device.type, enabled=False):
        return _reference(q, k, None, q.shape[-1] ** -0.5 if scale is None else float(scale), chunk)[1]


def _reference(q: Tensor, k: Tensor, v: Tensor | None, scale: float, chunk: int) -> tuple[Tensor | None, Tensor]:
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(work) * scale
    shape = q.shape[:-1]
    m = torch.full(shape, -torch.inf, dtype=work, device=q.device)
    l = torch.zeros(shape, dtype=work, device=q.device)
    e = torch.zeros(shape, dtype=work, device=q.device)  # Σ p̃ (s - m)
    acc = None if v is None else torch.zeros(*shape, v.shape[-1], dtype=work, device=q.device)
    for start in range(0, k.shape[-2], chunk):
        kc = k[..., start : start + chunk, :].to(work)
        s = qf @ kc.transpose(-1, -2)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        shift = torch.where(l > 0, m - m_new, torch.zeros_like(m))  # avoid 0 · (-inf) on the first chunk
        p = torch.exp(s - m_new[..., None])
        e = alpha * (e + l * shift) + (p * (s - m_new[..., None])).sum(-1)
        l = alpha * l + p.sum(-1)
        if v is not None:
            acc = alpha[..., None] * acc + p @ v[..., start : start + chunk, :].to(work)
        m = m_new
    out = None if v is None else (acc / l[..., None]).to(q.dtype)
    entropy = (torch.log(l) - e / l).to(torch.float32)
    return out, entropy


def naive_attention_entropy(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Materializes the Lq×Lk probabilities (the "naive" baseline of the paper's Table 6)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return (p @ v.float()).to(q.dtype), entropy

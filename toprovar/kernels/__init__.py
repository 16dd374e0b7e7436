"""Attention kernels with per-query entropy (Flash Attention Entropy) and their references.

Two ways to the same `(out, entropy)`: q (B, H, Lq, D), k/v (B, H, Lk, D), no mask, Lq ≤ Lk
allowed; `entropy` (B, H, Lq) float32 in nats.

- `sdpa_entropy(q, k, v, scale=None)`: `out` is PyTorch SDPA's, bit for bit, and the entropy is
  one more pass over q·kᵀ with no V. On CUDA (Triton) SDPA's backend is asked for its
  log-sum-exp (`sdpa.sdpa_with_lse`) and the entropy-only kernel reads it (`lse_entropy`: no
  running max); elsewhere the chunked reference's streaming pass without V
  (`reference.entropy_reference`), bit for bit the reference's entropy. A scale that computes
  entropy then runs exactly the attention of one that does not.
- `flash_attn_entropy(q, k, v, scale=None)`: the Flash Attention Entropy kernel, out and entropy
  in one pass (Triton on CUDA for power-of-two head dims 16..256, fp16/bf16/fp32; the chunked
  PyTorch reference elsewhere); its `out` rounds differently from SDPA's. `flash_attn` is the same
  kernel without entropy (for fair timing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from toprovar.kernels.reference import attention_entropy_reference, entropy_reference, naive_attention_entropy
from toprovar.kernels.sdpa import autocast_inputs, sdpa_with_lse


def _triton_ok(q: Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        from toprovar.kernels import triton_fae
    except ImportError:  # triton missing: fall back to the reference
        return False
    return triton_fae.supported(q)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B,H,Lq,D), k and v (B,H,Lk,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def flash_attn_entropy(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    _check(q, k, v)
    if _triton_ok(q):
        from toprovar.kernels.triton_fae import fae_forward

        return fae_forward(q, k, v, scale, with_entropy=True)
    return attention_entropy_reference(q, k, v, scale)


def flash_attn(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    _check(q, k, v)
    if _triton_ok(q):
        from toprovar.kernels.triton_fae import fae_forward

        return fae_forward(q, k, v, scale, with_entropy=False)[0]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def lse_entropy(q: Tensor, k: Tensor, lse: Tensor, scale: float | None = None) -> Tensor:
    """Entropy `(B, H, Lq)` float32 of softmax(scale·q·kᵀ) rows whose log-sum-exp is `lse` (B, H, Lq):
    the Triton entropy-only kernel on CUDA; elsewhere the streaming reference (which needs no lse)."""
    if _triton_ok(q) and q.dtype == k.dtype:
        from toprovar.kernels.triton_fae import entropy_forward

        return entropy_forward(q, k, lse, scale)
    return entropy_reference(q, k, scale)


def sdpa_entropy(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """`(F.scaled_dot_product_attention(q, k, v, scale=scale) bit for bit, entropy)`."""
    _check(q, k, v)
    q, k, v = autocast_inputs(q, k, v)
    if not _triton_ok(q):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), entropy_reference(q, k, scale)
    out, lse = sdpa_with_lse(q, k, v, scale)
    if lse is None:  # SDPA's math fallback: no log-sum-exp to read
        return out, entropy_reference(q, k, scale)
    return out, lse_entropy(q, k, lse, scale)


__all__ = [
    "flash_attn_entropy",
    "flash_attn",
    "sdpa_entropy",
    "lse_entropy",
    "attention_entropy_reference",
    "entropy_reference",
    "naive_attention_entropy",
]

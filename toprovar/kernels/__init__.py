"""Attention kernels with per-query entropy (Flash Attention Entropy) and their references.

`flash_attn_entropy(q, k, v, scale=None) -> (out, entropy)`: q (B, H, Lq, D), k/v (B, H, Lk, D),
no mask, Lq ≤ Lk allowed; `entropy` (B, H, Lq) float32 in nats. Dispatch: the Triton kernel for
CUDA tensors (power-of-two head dims 16..256, fp16/bf16/fp32), the chunked PyTorch reference
everywhere else. `flash_attn` is the same kernel without entropy (for fair timing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from toprovar.kernels.reference import attention_entropy_reference, naive_attention_entropy


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


__all__ = ["flash_attn_entropy", "flash_attn", "attention_entropy_reference", "naive_attention_entropy"]

"""The one attention entry point of the model.

`attention(q, k, v, *, entropy, scale)` is what every self-attention call goes through; the model
never knows which kernel ran. Tensors are `(B, H, L, D)`; the entropy is the natural-log Shannon
entropy of each query's softmax row, `(B, H, Lq)` float32. Without entropy, PyTorch SDPA runs
(flash / cuDNN / efficient on CUDA). With entropy, the plain PyTorch reference below runs until the
Triton kernel of `kernels/` is plugged in here.

`cross_attention` serves the text cross-attention (short, padded text keys with a padding mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, entropy: bool,
              scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Softmax attention of every query over every key (no mask): `(out, entropy_or_None)`."""
    if entropy:
        return attention_with_entropy_reference(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def attention_with_entropy_reference(q: Tensor, k: Tensor, v: Tensor,
                                     scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch attention that also returns the entropy of each softmax row.

    Scores in float32; entropy = logsumexp(s) - sum(p * s), exact for any finite scores.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):  # a reference: float32 even under autocast
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        out = torch.matmul(probs, v.float()).to(v.dtype)
        ent = lse.squeeze(-1) - (probs * scores).sum(dim=-1)
    return out, ent


def cross_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                    scale: float | None = None) -> Tensor:
    """Queries `(B, H, Lq, D)` over text keys `(B, H, Lt, D)`; mask `(B, Lt)` True = real token."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

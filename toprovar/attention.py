"""The one attention entry point of the model.

`attention(q, k, v, *, entropy, scale)` is what every self-attention call goes through; the model
never knows which kernel ran. Tensors are `(B, H, L, D)`; the entropy is the natural-log Shannon
entropy of each query's softmax row, `(B, H, Lq)` float32. Without entropy, PyTorch SDPA runs
(flash / cuDNN / efficient on CUDA). With entropy, `kernels.flash_attn_entropy` runs: the Triton
Flash Attention Entropy kernel on CUDA, its chunked PyTorch reference (float32) elsewhere.

`cross_attention` serves the text cross-attention (short, padded text keys with a padding mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import flash_attn_entropy


def attention(q: Tensor, k: Tensor, v: Tensor, *, entropy: bool,
              scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Softmax attention of every query over every key (no mask): `(out, entropy_or_None)`."""
    if entropy:
        return flash_attn_entropy(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def cross_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                    scale: float | None = None) -> Tensor:
    """Queries `(B, H, Lq, D)` over text keys `(B, H, Lt, D)`; mask `(B, Lt)` True = real token."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

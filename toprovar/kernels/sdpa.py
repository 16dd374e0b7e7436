"""PyTorch SDPA's own output together with its log-sum-exp, for the entropy beside it.

`sdpa_with_lse(q, k, v, scale)` asks SDPA which backend it would run for these inputs
(`torch._fused_sdp_choice`, which honours `torch.nn.attention.sdpa_kernel` and the cuDNN-first
priority of `toprovar.attention.prefer_cudnn_attention`) and calls that backend's operator with
its log-sum-exp output on: the same kernel as `F.scaled_dot_product_attention`, so on CPU the
output is its bits (checked by tests/test_kernels_fae.py at the model's shapes). On CUDA the
flash kernel always writes the log-sum-exp; the efficient and cuDNN kernels are asked for it
(`compute_log_sumexp=True`), which the GPU test checks leaves the output bit for bit as SDPA's.
Where SDPA runs its math fallback, which has no log-sum-exp, lse is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

_FLASH, _EFFICIENT, _CUDNN = (
    SDPBackend.FLASH_ATTENTION.value,
    SDPBackend.EFFICIENT_ATTENTION.value,
    SDPBackend.CUDNN_ATTENTION.value,
)


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The dtype SDPA would run in under autocast (it is on autocast's lower-precision list)."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """`(F.scaled_dot_product_attention(q, k, v, scale=scale), its log-sum-exp (B, H, Lq) float32
    in nats or None)`; no mask, no dropout, not causal. Give it `autocast_inputs`' tensors under
    autocast (the private operators below are not autocast's)."""
    B, H, Lq, _ = q.shape
    backend = torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale)
    aten = torch.ops.aten
    if backend == _FLASH and q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    elif backend == _FLASH:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    elif backend == _EFFICIENT:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., :Lq]  # rows padded to a multiple of 32
    elif backend == _CUDNN:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        lse = lse.reshape(B, H, Lq)  # (B, H, Lq, 1)
    else:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    return out, lse.float()


__all__ = ["autocast_inputs", "sdpa_with_lse"]

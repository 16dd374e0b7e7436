"""GroupNorm (+ SiLU) over channels-last activations: the VAE decoder's normalization.

At batch 1 PyTorch's GroupNorm reduces each of the 32 groups in one thread block (32 blocks on a
132-multiprocessor GPU, each reading 8-16 MB at 1024x1024) and applies the affine map and the
SiLU in separate passes. Here the statistics are split over many blocks (per-block float32 sums
and sums of squares of each channel, combined in float64), and one pass applies normalization,
affine and SiLU.

`group_norm_silu(x, groups, weight, bias, eps, silu)`: x `(N, C, H, W)` in channels-last memory
on CUDA runs the Triton kernels; anything else runs the reference `F.group_norm` (+ `F.silu`).
The kernels differ from the reference by float32 rounding in the statistics and by rounding
once (after the SiLU) instead of twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def group_norm_silu_reference(
    x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, silu: bool = True
) -> Tensor:
    h = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(h) if silu else h


if triton is not None:

    @triton.jit
    def _gn_stats_kernel(X, PART, HW, C, CHUNK, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        k = tl.program_id(0)  # the many-block axis is axis 0 (axis 1 stops at 65535 blocks)
        n = tl.program_id(1).to(tl.int64)
        nk = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_C)
        mc = cols < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        p_start = k * CHUNK
        for p0 in range(0, CHUNK, BLOCK_P):
            rows = p_start + p0 + tl.arange(0, BLOCK_P)
            m = (rows < HW)[:, None] & mc[None, :]
            x = tl.load(X + (n * HW + rows[:, None]) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += x
            acc2 += x * x
        base = PART + (n * nk + k) * 2 * C
        tl.store(base + cols, tl.sum(acc, axis=0), mask=mc)
        tl.store(base + C + cols, tl.sum(acc2, axis=0), mask=mc)

    @triton.jit
    def _gn_apply_kernel(
        X, Y, MEAN, RSTD, W, B, HW, C, CG, G, SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        pb = tl.program_id(0)  # pixel blocks on axis 0: 2^31 - 1 blocks (axis 1 stops at 65535)
        n = tl.program_id(1).to(tl.int64)
        rows = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_C)
        mc = cols < C
        g = cols // CG
        mean = tl.load(MEAN + n * G + g, mask=mc, other=0.0)
        rstd = tl.load(RSTD + n * G + g, mask=mc, other=0.0)
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)
        m = (rows < HW)[:, None] & mc[None, :]
        offs = (n * HW + rows[:, None]) * C + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * (rstd * w)[None, :] + b[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_config(n: int, c: int, hw: int, sms: int = 132) -> dict:
    """Block shapes and grids of both kernels: a (BLOCK_P pixels x BLOCK_C channels) tile of about
    4096 elements; the statistics split over about 4 blocks per multiprocessor. The many-block
    axis is grid axis 0 (a grid's axis 1 stops at 65535 blocks: 256 channels at 1024x1024 make
    65536 pixel blocks)."""
    block_c = 1 << max(0, (c - 1).bit_length())
    block_p = max(1, 4096 // block_c)
    nk = max(1, min(_cdiv(hw, block_p), 4 * sms // max(n, 1)))
    chunk = _cdiv(_cdiv(hw, nk), block_p) * block_p
    nk = _cdiv(hw, chunk)
    return {
        "block_c": block_c,
        "block_p": block_p,
        "chunk": chunk,
        "stats_grid": (nk, n),
        "apply_grid": (_cdiv(hw, block_p), n),
    }


def _supported(x: Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_silu(
    x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, silu: bool = True, use_triton: bool | None = None
) -> Tensor:
    """GroupNorm of `(N, C, H, W)` (+ SiLU); channels-last CUDA input takes the Triton kernels."""
    if use_triton is None:
        use_triton = _supported(x)
    if not use_triton:
        return group_norm_silu_reference(x, groups, weight, bias, eps, silu)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    hw, cg = h * w, c // groups
    cfg = launch_config(n, c, hw)
    block_p, block_c, nk, chunk = cfg["block_p"], cfg["block_c"], cfg["stats_grid"][0], cfg["chunk"]
    part = torch.empty((n, nk, 2, c), dtype=torch.float32, device=x.device)
    _gn_stats_kernel[cfg["stats_grid"]](x, part, hw, c, chunk, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)
    sums = part.view(n, nk, 2, groups, cg).sum(dim=(1, 4), dtype=torch.float64)  # (N, 2, G)
    count = hw * cg
    mean = sums[:, 0] / count
    var = (sums[:, 1] / count - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + eps).float().contiguous()
    mean = mean.float().contiguous()
    y = torch.empty_like(x)  # keeps the channels-last strides
    _gn_apply_kernel[cfg["apply_grid"]](
        x, y, mean, rstd, weight, bias, hw, c, cg, groups, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8
    )
    return y


__all__ = ["group_norm_silu", "group_norm_silu_reference", "launch_config"]

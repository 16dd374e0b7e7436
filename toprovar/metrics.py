"""Image similarity against a reference image: SSIM (Wang et al. 2004) and PSNR, on uint8 RGB.

SSIM uses torchmetrics' implementation (11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
data range 1 on images scaled to [0, 1]), computed per image over the three channels.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _as_float(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 255.0


def ssim(images: Tensor, references: Tensor, reduction: str = "none") -> Tensor:
    """SSIM of each image against its reference: (N,) in [-1, 1] (or the mean with reduction='mean')."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(_as_float(images), _as_float(references), data_range=1.0,
                                                 reduction="none").reshape(-1)
    return values.mean() if reduction == "mean" else values


def psnr(images: Tensor, references: Tensor, reduction: str = "none") -> Tensor:
    """PSNR in dB of each image against its reference: (N,); identical images give +inf."""
    mse = (_as_float(images) - _as_float(references)).pow(2).flatten(1).mean(1)
    values = 10.0 * torch.log10(1.0 / mse)
    return values.mean() if reduction == "mean" else values

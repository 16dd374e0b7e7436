"""Quality of generated images: SSIM (Wang et al. 2004) and PSNR against a reference image, on uint8
RGB, and the backbone's automatic prompt evaluator where it has one (`geneval_scorer`).

SSIM and PSNR are torchmetrics' implementations on images scaled to [0, 1] (data range 1). SSIM:
11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, per image over the three channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "pooled")
# geneval-lite scores per prompt: success of all the caption's checks, and the share of them that hold.
GENEVAL_SCORES = ("binary", "share")
Evaluator = Callable[[Tensor, Sequence[Any]], dict[str, np.ndarray]]


def _as_float(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 255.0


def ssim(images: Tensor, references: Tensor, reduction: str = "none") -> Tensor:
    """SSIM of each image against its reference: (N,) in [-1, 1] (or the mean with reduction='mean')."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(
        _as_float(images), _as_float(references), data_range=1.0, reduction="none"
    ).reshape(-1)
    return values.mean() if reduction == "mean" else values


def psnr(images: Tensor, references: Tensor, reduction: str = "none") -> Tensor:
    """PSNR in dB against the references; identical images give +inf.

    reduction: 'none' — (N,), one per image; 'mean' — the mean of those; 'pooled' — one value from
    the mean squared error over all images (what a set of images scores as a whole: one bad image
    cannot be averaged away in dB, and identical images do not make the mean infinite).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    preds, target = _as_float(images), _as_float(references)
    if reduction == "pooled":
        return peak_signal_noise_ratio(preds, target, data_range=1.0)
    values = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.mean() if reduction == "mean" else values


def geneval_scorer(backbone_name: str) -> Evaluator | None:
    """The backbone's automatic evaluator `(images, prompts) -> {score name: (N,) in [0, 1]}` for
    every name in `GENEVAL_SCORES`, or None where the backbone has none (`BackboneSpec.geneval`).

    Only `tiny` has one: geneval-lite (`toprovar.tiny.evaluate.geneval_lite_scores`) — `binary`, 1
    where every check of the prompt's caption holds; `share`, the share of its checks that hold
    (graded; half the paired noise, docs/benchmarks.md). `prompts` are captions or scenes.
    """
    from toprovar.models.registry import get_backbone  # lazy: the metrics stay importable without the models

    geneval = get_backbone(backbone_name).geneval
    if geneval is None:
        return None

    def score(images: Tensor, prompts: Sequence[Any]) -> dict[str, np.ndarray]:
        return dict(zip(GENEVAL_SCORES, geneval(images, prompts)))

    return score

"""Quality of generated images against the unpruned ones: SSIM per image, geneval-lite on `tiny`
(`toprovar.metrics.geneval_scorer`, the one place that knows which backbone has an evaluator)."""
from __future__ import annotations

from torch import Tensor

from toprovar.metrics import GENEVAL_SCORES, Evaluator, geneval_scorer, ssim

__all__ = ["GENEVAL_SCORES", "Evaluator", "geneval_scorer", "ssim_per_image"]


def ssim_per_image(images: Tensor, references: Tensor) -> Tensor:
    """SSIM of each uint8 `(N, H, W, 3)` image against its reference: `(N,)` float32."""
    return ssim(images, references, reduction="none").float().reshape(-1)

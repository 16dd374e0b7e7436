"""Quality of generated images against the unpruned ones: SSIM per image, geneval-lite on `tiny`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def ssim_per_image(images: Tensor, references: Tensor) -> Tensor:
    """SSIM of each uint8 `(N, H, W, 3)` image against its reference: `(N,)` float32."""
    try:
        from toprovar.metrics import ssim  # the project's metric, when present
    except ImportError:
        ssim = None
    if ssim is not None:
        return torch.as_tensor(ssim(images, references, reduction="none"), dtype=torch.float32).reshape(-1)
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a = images.permute(0, 3, 1, 2).float() / 255.0
    b = references.permute(0, 3, 1, 2).float() / 255.0
    return tm_ssim(a, b, data_range=1.0, reduction="none").float().reshape(-1)


Scorer = Callable[[Tensor, Sequence[Any]], Tensor]


def geneval_scorer(backbone_name: str) -> Scorer | None:
    """The backbone's automatic evaluator `(images, prompts) -> (N,) scores in [0, 1]`, if it has one."""
    if backbone_name != "tiny":
        return None
    from toprovar.tiny.evaluate import geneval_lite  # lazy: only the tiny backbone has an evaluator

    def score(images: Tensor, prompts: Sequence[Any]) -> Tensor:
        return torch.as_tensor(geneval_lite(images, prompts), dtype=torch.float32).reshape(-1)

    return score

"""Quality of generated images against the unpruned ones: SSIM per image, geneval-lite on `tiny`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from toprovar.metrics import ssim


def ssim_per_image(images: Tensor, references: Tensor) -> Tensor:
    """SSIM of each uint8 `(N, H, W, 3)` image against its reference: `(N,)` float32."""
    return ssim(images, references, reduction="none").float().reshape(-1)


Scorer = Callable[[Tensor, Sequence[Any]], Tensor]


def geneval_scorer(backbone_name: str) -> Scorer | None:
    """The backbone's automatic evaluator `(images, prompts) -> (N,) scores in [0, 1]`, if it has one."""
    if backbone_name != "tiny":
        return None
    from toprovar.tiny.evaluate import geneval_lite  # lazy: only the tiny backbone has an evaluator

    def score(images: Tensor, prompts: Sequence[Any]) -> Tensor:
        return torch.as_tensor(geneval_lite(images, prompts), dtype=torch.float32).reshape(-1)

    return score

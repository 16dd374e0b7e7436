"""Quality of generated images against the unpruned ones: SSIM per image, geneval-lite on `tiny`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from torch import Tensor

from toprovar.metrics import ssim

# geneval-lite scores per prompt (toprovar.tiny.evaluate): success of all the caption's checks,
# and the share of its checks that hold (graded; half the paired noise, docs/benchmarks.md).
GENEVAL_SCORES = ("binary", "share")


def ssim_per_image(images: Tensor, references: Tensor) -> Tensor:
    """SSIM of each uint8 `(N, H, W, 3)` image against its reference: `(N,)` float32."""
    return ssim(images, references, reduction="none").float().reshape(-1)


Evaluator = Callable[[Tensor, Sequence[Any]], dict[str, np.ndarray]]


def geneval_scorer(backbone_name: str) -> Evaluator | None:
    """The backbone's automatic evaluator `(images, prompts) -> {score name: (N,) in [0, 1]}`
    for every name in GENEVAL_SCORES, if it has one."""
    if backbone_name != "tiny":
        return None
    from toprovar.tiny.evaluate import geneval_lite_scores  # lazy: only the tiny backbone has an evaluator

    def score(images: Tensor, prompts: Sequence[Any]) -> dict[str, np.ndarray]:
        return dict(zip(GENEVAL_SCORES, geneval_lite_scores(images, prompts)))

    return score

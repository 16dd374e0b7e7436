"""Quality of generated images against the unpruned ones: SSIM per image, geneval-lite on `tiny`
(`toprovar.metrics.geneval_scorer`, the one place that knows which backbone has an evaluator), and
an optional text–image score (CLIPScore from a local CLIP model) for real backbones.

Everything per prompt, so the search and the held-out acceptance can pair a policy's image with the
unpruned one of the same prompt and seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from toprovar.errors import UserError
from toprovar.metrics import GENEVAL_SCORES, Evaluator, geneval_scorer, ssim

__all__ = ["GENEVAL_SCORES", "Evaluator", "geneval_scorer", "ssim_per_image", "check_clip_folder", "ClipScorer"]

# SSIM in chunks of this many images: at 1024² torchmetrics' Gaussian filter holds ~5 float copies
# of each image pair (~120 MB an image).
SSIM_CHUNK = 16


def ssim_per_image(images: Tensor, references: Tensor, device: torch.device | str | None = None) -> Tensor:
    """SSIM of each uint8 `(N, H, W, 3)` image against its reference: `(N,)` float32 on the CPU.

    `device`: where to compute (the generation's GPU: the uint8 images go over and become floats
    there); None: where the images are. SSIM of twelve 1024² images takes seconds on a CPU core.
    """
    values = []
    for start in range(0, images.shape[0], SSIM_CHUNK):
        a, b = images[start : start + SSIM_CHUNK], references[start : start + SSIM_CHUNK]
        if device is not None:
            a, b = a.to(device, non_blocking=True), b.to(device, non_blocking=True)
        values.append(ssim(a, b, reduction="none").float().reshape(-1).cpu())
    return torch.cat(values) if values else torch.zeros(0)


# -- CLIPScore ------------------------------------------------------------------------------------

CLIP_FILES = {"config.json": "its config", "preprocessor_config.json": "its image processor"}
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer file, or the slow one's vocabulary


def check_clip_folder(path: str | Path, key: str = "quality.clip") -> Path:
    """The folder of a CLIP model saved with `save_pretrained` (a Hugging Face CLIPModel with its
    processor), checked from its files alone, before any model is loaded: a one-line UserError
    naming `key` when it is missing, not a CLIP model, or lacks the processor's files."""
    folder = Path(path).expanduser()
    hint = f"give {key}=/path/to/a/local/CLIP folder (CLIPModel + CLIPProcessor .save_pretrained), or {key}=null"
    if not folder.is_dir():
        raise UserError(f"{key}={path}: no such folder; {hint}")
    for name, what in CLIP_FILES.items():
        if not (folder / name).is_file():
            raise UserError(f"{key}={path}: not a CLIP model folder ({name}, {what}, is missing); {hint}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{key}={path}: config.json is not a JSON object; {hint}") from None
    if model_type != "clip":
        raise UserError(f"{key}={path}: not a CLIP model (config.json model_type is {model_type!r}, not 'clip')")
    if not any((folder / name).is_file() for name in CLIP_TOKENIZER_FILES):
        raise UserError(
            f"{key}={path}: not a CLIP model folder (no tokenizer: {' or '.join(CLIP_TOKENIZER_FILES)}); {hint}"
        )
    return folder


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose `get_image_features` / `get_text_features` return the projected embedding
    tensor. transformers 5 returns a ModelOutput holding it in `pooler_output`, which torchmetrics
    1.9's CLIPScore does not unwrap (Lightning-AI/torchmetrics#3407, fixed after 1.9.0 by #3408)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScorer:
    """CLIPScore (torchmetrics: 100 · max(cos(image, text), 0) of the CLIP embeddings) of each
    image against its prompt, from a local CLIP folder (`check_clip_folder`; nothing downloaded).

    `(images (N, H, W, 3) uint8, texts) -> {"clip": (N,)}`; the model runs on `device` (the images
    go there; CLIPProcessor resizes them on the CPU first, as torchmetrics does)."""

    name = "clip"

    def __init__(self, folder: str | Path, device: torch.device | str):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        folder = check_clip_folder(folder)
        self.device = torch.device(device)
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(self.device)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor)).to(self.device)

    @torch.inference_mode()
    def __call__(self, images: Tensor, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} prompts")
        chw = images.permute(0, 3, 1, 2).to(self.device)
        # One image per call: CLIPScore's update keeps only the batch's sum.
        values = [float(self.metric(chw[i : i + 1], [str(text)])) for i, text in enumerate(texts)]
        self.metric.reset()
        return {self.name: np.asarray(values, dtype=np.float64)}

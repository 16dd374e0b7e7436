"""The small random-weight test backbones, registered on import; kept out of the installed package.

`test-small` and `test-small-patchify` need no files (seeded random weights, `HashedTextEncoder`);
`test-small-t5` and `test-small-patchify-t5` read what `python -m toprovar.checkpoints synth
preset=small` writes, at the shapes declared there. The registry imports this module when
$TOPROVAR_EXTRA_BACKBONES names it, and the Hydra apps then find the config groups in `conf/` beside
it (`toprovar.cli.extra_conf_dirs`); tests/conftest.py and the benchmarks' `--smoke` modes set that up
(`use_test_backbones`).
"""

from __future__ import annotations

import os
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from toprovar.checkpoints.synth import RELEASES
from toprovar.extras import EXTRA_BACKBONES_ENV
from toprovar.models.registry import BackboneSpec, register_backbone, register_text_encoder
from toprovar.models.text_encoder import TextFeatures

REPO = Path(__file__).resolve().parents[1]
SMALL_T5 = RELEASES["infinity-2b"].small
SMALL_PATCHIFY_T5 = RELEASES["infinity-8b"].small
SMALL = replace(SMALL_T5.transformer, block_chunks=1)  # test-small's transformer: blocks not chunked
SMALL_PATCHIFY = SMALL_PATCHIFY_T5.transformer


def use_test_backbones() -> None:
    """Make these backbones known to this process and to the subprocesses it starts: this module
    named in $TOPROVAR_EXTRA_BACKBONES, the checkout on PYTHONPATH (so `tests.backbones` imports)."""
    os.environ[EXTRA_BACKBONES_ENV] = __name__
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


class HashedTextEncoder:
    """Test text encoder: each word maps to a fixed random vector (seeded by its CRC32).

    Gives prompt-dependent, reproducible features without any model files.
    """

    def __init__(self, channels: int, max_length: int, device: torch.device | str = "cpu"):
        self.channels, self.max_length, self.device = channels, max_length, torch.device(device)
        self.hidden_size = channels

    def _word(self, word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
        return torch.randn(self.channels, generator=gen)

    def encode(self, prompts: list[str]) -> TextFeatures:
        words = [p.split() or [""] for p in prompts]
        if any(len(w) > self.max_length for w in words):
            warnings.warn(
                f"prompt longer than the text encoder's limit of {self.max_length} words; truncated", stacklevel=2
            )
            words = [w[: self.max_length] for w in words]
        lens = torch.tensor([len(w) for w in words], dtype=torch.int32)
        feats = torch.zeros(len(prompts), int(lens.max()), self.channels)
        for i, ws in enumerate(words):
            for j, word in enumerate(ws):
                feats[i, j] = self._word(word)
        mask = torch.arange(feats.shape[1])[None, :] < lens[:, None]
        return TextFeatures(feats, mask, lens).to(self.device)


def _hashed_text_encoder_factory(channels: int, max_length: int) -> Callable[..., Any]:
    def build(path: str | None, device: torch.device, dtype: torch.dtype) -> HashedTextEncoder:
        return HashedTextEncoder(channels, max_length, device)

    return build


def _register() -> None:
    register_text_encoder("hashed-test", _hashed_text_encoder_factory(SMALL.text_channels, SMALL.text_maxlen))
    hashed = BackboneSpec(
        name="test-small",
        transformer=SMALL,
        vae=SMALL_T5.vae,
        text_encoder="hashed-test",
        pixels="0.06M",
        guidance_scale=3.0,
        temperature=1.0,
        random_init=True,
    )
    # Importing twice (e.g. as `tests.backbones` and by path) registers the same specs again.
    for spec in (
        hashed,
        replace(hashed, name="test-small-patchify", transformer=SMALL_PATCHIFY, vae=SMALL_PATCHIFY_T5.vae),
        # The same two read from files (blocks in the official `block_chunks.c.module.j.` names) with a
        # T5 folder as text encoder: what `python -m toprovar.checkpoints synth preset=small` writes.
        replace(hashed, name=SMALL_T5.backbone, transformer=SMALL_T5.transformer, text_encoder="t5", random_init=False),
        replace(
            hashed,
            name=SMALL_PATCHIFY_T5.backbone,
            transformer=SMALL_PATCHIFY_T5.transformer,
            vae=SMALL_PATCHIFY_T5.vae,
            text_encoder="t5",
            random_init=False,
        ),
    ):
        register_backbone(spec, replace_existing=True)


_register()

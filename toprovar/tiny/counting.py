"""How well `tiny` counts: geneval-lite's counting check per asked count, with confidence intervals.

The scene grammar asks for two, three or four objects (`scenes.COUNTS`; no caption asks for one
or five), all of one shape and, in the `heldout` split, of one named colour from a held-out
(colour, shape) pair. An image passes when all of its caption's checks hold (`evaluate.checks`:
the shape is there, exactly the asked number of it, every one of them in the named colour) —
the binary geneval-lite score of the counting category. Beside it, from the same detection pass:
the share with exactly the asked number of the shape whatever their colour, and the shares with
fewer or more (which way the model errs).

Intervals are Wilson score intervals (`scipy.stats.binomtest(...).proportion_ci`, as in
calibration's whole-prompt bound): unlike the normal approximation they stay inside [0, 1] and
keep their coverage near 0 and 1, where a good model's accuracies sit.
The command that generates the images and prints the table: `python -m benchmarks.counting`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .evaluate import checks, detect
from .scenes import COUNTS, PromptSpec, Scene, parse_caption, sample_scenes

__all__ = [
    "COUNT_VALUES",
    "HELDOUT_SEED",
    "TABLE_COLUMNS",
    "counting_scenes",
    "count_outcomes",
    "count_table",
    "generate_images",
]

COUNT_VALUES: tuple[int, ...] = tuple(sorted(COUNTS))  # (2, 3, 4)
HELDOUT_SEED = 4242  # the held-out prompts of the model card's geneval-lite table (train.evaluate_generation)
TABLE_COLUMNS = ("count", "n", "correct", "accuracy", "ci_low", "ci_high", "exact_count", "fewer", "more")


def counting_scenes(per_count: int, seed: int = HELDOUT_SEED, split: str = "heldout") -> list[Scene]:
    """The first `per_count` counting scenes of each count in `sample_scenes(.., seed, split)`, in
    the order drawn (counts interleaved, so every batch mixes them). `heldout`: every scene asks
    for a held-out (colour, shape) pair by name; `train`: only pairs seen in training."""
    if per_count < 1:
        raise ValueError(f"per_count must be >= 1, got {per_count}")
    drawn = 16 * per_count  # counting is a quarter of the held-out kinds (a sixth of all), each count a third
    while True:
        taken = {c: 0 for c in COUNT_VALUES}
        out = []
        for scene in sample_scenes(drawn, seed, split):  # a longer draw extends a shorter one
            n = len(scene.objects)
            if scene.kind == "counting" and taken[n] < per_count:
                taken[n] += 1
                out.append(scene)
        if min(taken.values()) == per_count:
            return out
        drawn *= 2


def _spec(prompt: str | Scene | PromptSpec) -> PromptSpec:
    if isinstance(prompt, PromptSpec):
        spec = prompt
    else:
        spec = parse_caption(prompt.caption if isinstance(prompt, Scene) else prompt)
    if spec.category != "counting":
        raise ValueError(f"not a counting prompt ({spec.category}): {prompt!r}")
    return spec


def count_outcomes(images, prompts: Sequence[str | Scene | PromptSpec]) -> pd.DataFrame:
    """One row per image: asked count, shape, detected number of that shape, and the checks.

    images: uint8 `(N, H, W, 3)`; prompts: counting captions (or their scenes / specs).
    Columns: count, shape, detected, correct (all geneval-lite checks hold: the category's score),
    exact_count (the `count` check alone: exactly `count` objects of the shape, any colour).
    """
    arr = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if len(arr) != len(prompts):
        raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
    rows = []
    for img, prompt in zip(arr, prompts):
        spec = _spec(prompt)
        (obj,) = spec.objects
        found = detect(img)
        held = checks(found, spec)
        rows.append(
            {
                "count": obj.count,
                "shape": obj.shape,
                "detected": sum(d.shape == obj.shape for d in found),
                "correct": all(held.values()),
                "exact_count": held["count:0"],
            }
        )
    return pd.DataFrame(rows, columns=["count", "shape", "detected", "correct", "exact_count"])


def _row(label, group: pd.DataFrame, confidence: float) -> dict:
    n, k = len(group), int(group.correct.sum())
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {
        "count": label,
        "n": n,
        "correct": k,
        "accuracy": k / n,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "exact_count": float(group.exact_count.mean()),
        "fewer": float((group.detected < group["count"]).mean()),
        "more": float((group.detected > group["count"]).mean()),
    }


def count_table(outcomes: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per asked count present (ascending), then `overall` (all images pooled): n, correct,
    accuracy = correct / n with its Wilson interval, and the shares with exactly the asked number
    of the shape, fewer or more (these three sum to 1)."""
    if outcomes.empty:
        raise ValueError("no outcomes to tabulate")
    rows = [_row(c, g, confidence) for c, g in outcomes.groupby("count", sort=True)]
    rows.append(_row("overall", outcomes, confidence))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def generate_images(backbone, captions: Sequence[str], seeds: Sequence[int], batch: int = 8, progress=None):
    """Unpruned images (`policy="none"`, the backbone's default settings) from `toprovar.pipeline.
    generate` in batches of `batch`; `progress(done, total)` after each batch."""
    from toprovar.pipeline import generate

    out = []
    for i in range(0, len(captions), batch):
        out.append(generate(backbone, list(captions[i : i + batch]), list(seeds[i : i + batch]), policy="none").images)
        if progress is not None:
            progress(min(i + batch, len(captions)), len(captions))
    return torch.cat(out)

"""geneval-lite: GenEval-style automatic scoring of `tiny` images against their captions.

Objects are saturated, backgrounds desaturated (scenes.py guarantees it), so detection needs no
learned model: foreground = pixels with high chroma, colour = nearest palette hue (the darker
texture shade has the same hue, so stripes and dots stay inside their object), objects = connected
components, shape = fill ratio of the bounding box + solidity (area / convex-hull area). Each image
then gets 1.0 or 0.0 per its caption's GenEval category (all of the caption's checks hold: shapes,
colours, count, relation), and the report averages per category. `check_share` is the graded
companion: the share of those checks that hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .scenes import COLORS, KINDS, PromptSpec, Scene, parse_caption

__all__ = [
    "Detection",
    "detect",
    "checks",
    "score",
    "check_share",
    "geneval_lite",
    "geneval_lite_scores",
    "geneval_report",
]

CHROMA_THRESHOLD = 0.25  # objects: >= 0.44 (dark shade) .. 0.81; backgrounds: <= 0.11
MIN_AREA_FRACTION = 0.003  # components below 0.3% of the image (49 px at 128^2) are specks
SPLIT_FRACTION = 0.25  # a component whose second colour covers this much is two objects
POSITION_MARGIN = 0.05  # centres must differ by this much (fraction of the side)

_NAMES = tuple(COLORS)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in radians from the opponent axes (same formula for pixels and palette)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.arctan2(math.sqrt(3) / 2 * (g - b), r - (g + b) / 2)


_PALETTE_HUE = _hue(np.array([COLORS[c] for c in _NAMES], dtype=np.float32) / 255)


@dataclass(frozen=True)
class Detection:
    """One object found in an image: centre in [0, 1] (y down), area in pixels, bbox (x0, y0, x1, y1)."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]


def _shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, radius ratio, solidity, centroid height) of a mask cropped to its bounding box.

    fill = area / box area; radius ratio = circumradius / inradius (about the centroid / largest
    inscribed disc); solidity = area / convex-hull area; centroid height as a fraction of the box
    height from the top (an apex-up triangle's centroid sits low, at 2/3).
    """
    area = int(mask.sum())
    ys, xs = np.nonzero(mask)
    r_out = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5
    r_in = ndimage.distance_transform_edt(np.pad(mask, 1)).max()
    centroid_y = (ys.mean() + 0.5) / mask.shape[0]
    ey, ex = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    corners = np.concatenate([np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        solidity = area / ConvexHull(corners).volume
    except QhullError:  # degenerate (a line of pixels)
        solidity = 1.0
    return area / mask.size, r_out / r_in, solidity, centroid_y


def _classify_shape(mask: np.ndarray) -> str:
    """A two-level decision; each split adds two normalised margins so that one clear feature
    outvotes a borderline other (blur rounds corners and fills the star's notches).

    ideal values      fill   radius ratio  solidity  centroid height
    circle            0.79   1.0           1         0.5
    square            1      1.41          1         0.5
    triangle          0.5    2.0           1         0.67
    star              0.39   2.2           0.56      0.55
    """
    fill, ratio, solidity, centroid_y = _shape_features(mask)
    if (0.685 - fill) / 0.05 + (ratio - 1.48) / 0.07 > 0:  # pointy
        return "triangle" if (solidity - 0.83) / 0.04 + (centroid_y - 0.56) / 0.015 > 0 else "star"
    return "square" if (ratio - 1.17) / 0.05 + (fill - 0.835) / 0.03 > 0 else "circle"


def detect(image) -> list[Detection]:
    """Objects in one uint8 (H, W, 3) RGB image (numpy or torch)."""
    img = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    h, w, _ = img.shape
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    chroma = (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).astype(np.float32) / 255
    fg = chroma > CHROMA_THRESHOLD
    fg = ndimage.binary_opening(fg)  # specks of noise
    fg = ndimage.binary_fill_holes(fg)  # holes a generated texture may leave
    labels, count = ndimage.label(fg)
    if count == 0:
        return []
    hue = _hue(img[fg].astype(np.float32))
    diff = np.abs(np.angle(np.exp(1j * (hue[:, None] - _PALETTE_HUE[None]))))
    colour = np.full((h, w), -1, dtype=np.int64)
    colour[fg] = diff.argmin(1)
    min_area = MIN_AREA_FRACTION * h * w
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == k
        if comp.sum() < min_area:
            continue
        votes = np.bincount(colour[sl][comp], weights=chroma[sl][comp], minlength=len(_NAMES))
        classes = [c for c in np.argsort(votes)[::-1] if votes[c] >= SPLIT_FRACTION * votes.sum()]
        if len(classes) == 1:  # one object; odd-coloured pixels (edges, noise) stay in it
            parts = [(comp, classes[0])]
        else:  # touching objects of different colours: split by colour
            parts = []
            for c in classes:
                sub, m = ndimage.label(comp & (colour[sl] == c))
                parts += [(sub == j, c) for j in range(1, m + 1)]
        for mask, c in parts:
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            found.append(
                Detection(
                    shape=_classify_shape(mask[y0:y1, x0:x1]),
                    color=_NAMES[c],
                    cx=float((xs.mean() + sl[1].start + 0.5) / w),
                    cy=float((ys.mean() + sl[0].start + 0.5) / h),
                    area=area,
                    bbox=(int(x0 + sl[1].start), int(y0 + sl[0].start), int(x1 + sl[1].start), int(y1 + sl[0].start)),
                )
            )
    return found


def _matches(d: Detection, shape: str, color: str | None) -> bool:
    return d.shape == shape and (color is None or d.color == color)


def _relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    m = POSITION_MARGIN
    return {
        "left_of": b.cx - a.cx > m,
        "right_of": a.cx - b.cx > m,
        "above": b.cy - a.cy > m,
        "below": a.cy - b.cy > m,
    }[relation]


def checks(detections: Sequence[Detection], spec: PromptSpec) -> dict[str, bool]:
    """The prompt's GenEval checks, by name; the prompt succeeds when all of them hold.

    Per named object: its shape is present (`shape:<i>`) and, if the caption names a colour, an
    object of that shape has it (`color:<i>`); counting adds the exact count (`count:0`), and
    its colour check asks every object of that shape to have the colour; position adds the
    relation between a matching pair (`relation`). Size, texture, location and background words
    are not checked (GenEval checks none of them).
    """
    objs, cat = spec.objects, spec.category
    if cat not in KINDS:
        raise ValueError(f"unknown category {cat!r}")
    found: dict[str, bool] = {}
    for i, o in enumerate(objs):
        same_shape = [d for d in detections if d.shape == o.shape]
        found[f"shape:{i}"] = bool(same_shape)
        if cat == "counting":
            found[f"count:{i}"] = len(same_shape) == o.count
            if o.color is not None:
                found[f"color:{i}"] = bool(same_shape) and all(d.color == o.color for d in same_shape)
        elif o.color is not None:
            found[f"color:{i}"] = any(_matches(d, o.shape, o.color) for d in detections)
    if cat == "position":
        a, b = objs
        found["relation"] = any(
            _relation_holds(da, db, spec.relation)
            for da in detections
            if _matches(da, a.shape, a.color)
            for db in detections
            if _matches(db, b.shape, b.color)
        )
    return found


def score(detections: Sequence[Detection], spec: PromptSpec) -> float:
    """1.0 if the detections satisfy the prompt's GenEval category (all its checks), else 0.0."""
    return float(all(checks(detections, spec).values()))


def check_share(detections: Sequence[Detection], spec: PromptSpec) -> float:
    """The share of the prompt's checks that hold, in [0, 1]; 1.0 exactly when `score` is 1.0.

    A graded companion of the binary score: an image that gets the shape right but the colour
    or the count wrong scores between 0 and 1, so a small perturbation moves it by a fraction
    of a prompt instead of a whole one (the per-prompt paired differences have less variance;
    docs/benchmarks.md, "Null noise of the geneval-lite scores").
    """
    found = checks(detections, spec)
    return sum(found.values()) / len(found)


def _spec(prompt) -> PromptSpec:
    if isinstance(prompt, PromptSpec):
        return prompt
    return parse_caption(prompt.caption if isinstance(prompt, Scene) else prompt)


def _images(images) -> np.ndarray:
    arr = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    return arr


def geneval_lite(images, prompts: Sequence[str | Scene | PromptSpec]) -> list[float]:
    """One GenEval-style score in {0.0, 1.0} per image; prompts are captions or scenes."""
    return geneval_lite_scores(images, prompts)[0].tolist()


def geneval_lite_scores(images, prompts: Sequence[str | Scene | PromptSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(binary score, share of checks) per image, float64 `(N,)` each, from one detection pass."""
    arr = _images(images)
    if len(arr) != len(prompts):
        raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]
    found = [checks(detect(img), spec) for img, spec in zip(arr, specs)]
    binary = np.array([float(all(f.values())) for f in found], dtype=np.float64)
    share = np.array([sum(f.values()) / len(f) for f in found], dtype=np.float64)
    return binary, share


def geneval_report(images, prompts: Sequence[str | Scene | PromptSpec]) -> pd.DataFrame:
    """Rows (category, n, score) per category present, then `overall` = mean of category scores."""
    specs = [_spec(p) for p in prompts]
    frame = pd.DataFrame({"category": [s.category for s in specs], "score": geneval_lite(images, specs)})
    rows = [
        {"category": c, "n": int((frame.category == c).sum()), "score": float(frame.score[frame.category == c].mean())}
        for c in KINDS
        if (frame.category == c).any()
    ]
    overall = float(np.mean([r["score"] for r in rows])) if rows else float("nan")
    rows.append({"category": "overall", "n": len(frame), "score": overall})
    return pd.DataFrame(rows, columns=["category", "n", "score"])

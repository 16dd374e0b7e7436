"""Official Infinity scale schedules: one per aspect-ratio template and pixel budget.

Facts from the official `infinity/utils/dynamic_resolution.py`: each template (height / width)
lists 13 token grids (h, w); a pixel budget uses the first 7, 10, 12 or 13 of them ('0.06M',
'0.25M', '0.60M', '1M'); one token covers 16×16 pixels. Templates below 1 are the transposed
grids of the templates above 1, keyed by `int(1 / ratio * 1000) / 1000` as officially. Official
inference sets t = 1 for images, so every entry here is `(1, h, w)`.
"""
from __future__ import annotations

import math

from toprovar.errors import UserError

Schedule = list[tuple[int, int, int]]

PIXELS_PER_TOKEN_EDGE = 16

_RATIO_TO_GRIDS: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}

# Pixel budget name -> number of scales (official: the first 7, 10, 12 or 13 grids).
PIXEL_BUDGETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _all_templates() -> dict[float, list[tuple[int, int]]]:
    grids: dict[float, list[tuple[int, int]]] = {}
    for ratio, hws in _RATIO_TO_GRIDS.items():
        grids[ratio] = hws
        if ratio != 1.0:
            grids[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return grids


TEMPLATES: dict[float, list[tuple[int, int]]] = _all_templates()
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(sorted(TEMPLATES))

# Requests farther than this (relative) outside the template range have no template.
_RANGE_SLACK = 1.1


def nearest_template(h_div_w: float) -> float:
    """The template the official code picks (nearest in absolute difference)."""
    try:
        ratio = float(h_div_w)
    except (TypeError, ValueError):
        raise UserError(f"h_div_w={h_div_w!r} is not a number; give height/width, e.g. 1.0 or 0.5") from None
    lo, hi = H_DIV_W_TEMPLATES[0], H_DIV_W_TEMPLATES[-1]
    if not math.isfinite(ratio) or not (lo / _RANGE_SLACK <= ratio <= hi * _RANGE_SLACK):
        raise UserError(f"h_div_w={h_div_w!r} has no aspect-ratio template; use a height/width between "
                        f"{lo} and {hi} (templates: {', '.join(str(t) for t in H_DIV_W_TEMPLATES)})")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - ratio))


def check_pixels(pixels: str) -> str:
    if pixels not in PIXEL_BUDGETS:
        raise UserError(f"pixels={pixels!r} is not a known pixel budget; choose one of "
                        f"{', '.join(PIXEL_BUDGETS)}")
    return pixels


def scale_schedule(h_div_w: float = 1.0, pixels: str = "1M") -> Schedule:
    """`[(1, h, w), ...]` token grids, coarse to fine, for the template nearest to `h_div_w`."""
    grids = TEMPLATES[nearest_template(h_div_w)][: PIXEL_BUDGETS[check_pixels(pixels)]]
    return [(1, h, w) for h, w in grids]


def full_schedule(h_div_w: float) -> Schedule:
    """The template's 1M schedule; the official RoPE tables of every budget are built from it."""
    return scale_schedule(h_div_w, "1M")


def image_size(schedule: Schedule) -> tuple[int, int]:
    """(height, width) in pixels of the image a schedule decodes to."""
    _, h, w = schedule[-1]
    return h * PIXELS_PER_TOKEN_EDGE, w * PIXELS_PER_TOKEN_EDGE


def tokens_per_scale(schedule: Schedule) -> list[int]:
    return [t * h * w for t, h, w in schedule]

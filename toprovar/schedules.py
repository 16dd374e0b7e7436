"""Official Infinity scale schedules: one per aspect-ratio template and pixel budget.

Facts from the official `infinity/utils/dynamic_resolution.py`: each template (height / width)
lists 13 token grids (h, w); a pixel budget uses the first 7, 10, 12 or 13 of them ('0.06M',
'0.25M', '0.60M', '1M'); one token covers 16×16 pixels. Templates below 1 are the transposed
grids of the templates above 1, keyed by `int(1 / ratio * 1000) / 1000` as officially. Official
inference sets t = 1 for images, so every entry here is `(1, h, w)`.

A backbone names its `ScheduleFamily` (`BackboneSpec.schedules`): `INFINITY_SCHEDULES` for the
official models, a family of its own for a backbone trained here (e.g. `tiny`). The module-level
functions are the official family's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from toprovar.errors import UserError

Schedule = list[tuple[int, int, int]]

PIXELS_PER_TOKEN_EDGE = 16

_RATIO_TO_GRIDS: dict[float, list[tuple[int, int]]] = {
    1.000: [
        (1, 1),
        (2, 2),
        (4, 4),
        (6, 6),
        (8, 8),
        (12, 12),
        (16, 16),
        (20, 20),
        (24, 24),
        (32, 32),
        (40, 40),
        (48, 48),
        (64, 64),
    ],
    1.250: [
        (1, 1),
        (2, 2),
        (3, 3),
        (5, 4),
        (10, 8),
        (15, 12),
        (20, 16),
        (25, 20),
        (30, 24),
        (35, 28),
        (45, 36),
        (55, 44),
        (70, 56),
    ],
    1.333: [
        (1, 1),
        (2, 2),
        (4, 3),
        (8, 6),
        (12, 9),
        (16, 12),
        (20, 15),
        (24, 18),
        (28, 21),
        (36, 27),
        (48, 36),
        (60, 45),
        (72, 54),
    ],
    1.500: [
        (1, 1),
        (2, 2),
        (3, 2),
        (6, 4),
        (9, 6),
        (15, 10),
        (21, 14),
        (27, 18),
        (33, 22),
        (39, 26),
        (48, 32),
        (63, 42),
        (78, 52),
    ],
    1.750: [
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 4),
        (11, 6),
        (14, 8),
        (21, 12),
        (28, 16),
        (35, 20),
        (42, 24),
        (56, 32),
        (70, 40),
        (84, 48),
    ],
    2.000: [
        (1, 1),
        (2, 2),
        (4, 2),
        (6, 3),
        (10, 5),
        (16, 8),
        (22, 11),
        (30, 15),
        (38, 19),
        (46, 23),
        (60, 30),
        (74, 37),
        (90, 45),
    ],
    2.500: [
        (1, 1),
        (2, 2),
        (5, 2),
        (10, 4),
        (15, 6),
        (20, 8),
        (25, 10),
        (30, 12),
        (40, 16),
        (50, 20),
        (65, 26),
        (80, 32),
        (100, 40),
    ],
    3.000: [
        (1, 1),
        (2, 2),
        (6, 2),
        (9, 3),
        (15, 5),
        (21, 7),
        (27, 9),
        (36, 12),
        (45, 15),
        (54, 18),
        (72, 24),
        (90, 30),
        (111, 37),
    ],
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


@dataclass(frozen=True)
class ScheduleFamily:
    """The scale schedules of one backbone: token grids per aspect-ratio template, pixel budgets.

    `grids[ratio]` lists every grid of the template's largest budget, coarse to fine; a budget
    takes the first `budgets[name]` of them, so the largest budget's schedule is the "full"
    schedule the RoPE table is built from. `pixels_per_token` is the image edge one token covers.
    """

    name: str
    grids: Mapping[float, tuple[tuple[int, int], ...]]
    budgets: Mapping[str, int]
    pixels_per_token: int

    @property
    def templates(self) -> tuple[float, ...]:
        return tuple(sorted(self.grids))

    @property
    def full_budget(self) -> str:
        return max(self.budgets, key=self.budgets.__getitem__)

    def nearest_template(self, h_div_w: float) -> float:
        """The template the official code picks (nearest in absolute difference)."""
        try:
            ratio = float(h_div_w)
        except (TypeError, ValueError):
            raise UserError(f"h_div_w={h_div_w!r} is not a number; give height/width, e.g. 1.0 or 0.5") from None
        lo, hi = self.templates[0], self.templates[-1]
        if not math.isfinite(ratio) or not (lo / _RANGE_SLACK <= ratio <= hi * _RANGE_SLACK):
            listed = ", ".join(str(t) for t in self.templates)
            raise UserError(
                f"h_div_w={h_div_w!r} has no aspect-ratio template in the {self.name} schedules; "
                f"use a height/width between {lo} and {hi} (templates: {listed})"
            )
        return min(self.templates, key=lambda t: abs(t - ratio))

    def check_pixels(self, pixels: str) -> str:
        if pixels not in self.budgets:
            raise UserError(
                f"pixels={pixels!r} is not a pixel budget of the {self.name} schedules; choose one of "
                f"{', '.join(self.budgets)}"
            )
        return pixels

    def scale_schedule(self, h_div_w: float = 1.0, pixels: str | None = None) -> Schedule:
        """`[(1, h, w), ...]` token grids, coarse to fine, for the template nearest to `h_div_w`."""
        count = self.budgets[self.check_pixels(pixels or self.full_budget)]
        return [(1, h, w) for h, w in self.grids[self.nearest_template(h_div_w)][:count]]

    def full_schedule(self, h_div_w: float) -> Schedule:
        """The template's largest schedule; the RoPE tables of every budget are built from it."""
        return self.scale_schedule(h_div_w, self.full_budget)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        """(height, width) in pixels of the image a schedule decodes to."""
        _, h, w = schedule[-1]
        return h * self.pixels_per_token, w * self.pixels_per_token


INFINITY_SCHEDULES = ScheduleFamily(
    "Infinity", {r: tuple(g) for r, g in TEMPLATES.items()}, PIXEL_BUDGETS, PIXELS_PER_TOKEN_EDGE
)


def nearest_template(h_div_w: float) -> float:
    return INFINITY_SCHEDULES.nearest_template(h_div_w)


def check_pixels(pixels: str) -> str:
    return INFINITY_SCHEDULES.check_pixels(pixels)


def scale_schedule(h_div_w: float = 1.0, pixels: str = "1M") -> Schedule:
    """Official Infinity schedule: `[(1, h, w), ...]` for the template nearest to `h_div_w`."""
    return INFINITY_SCHEDULES.scale_schedule(h_div_w, pixels)


def full_schedule(h_div_w: float) -> Schedule:
    """The official template's 1M schedule; the official RoPE tables of every budget come from it."""
    return INFINITY_SCHEDULES.full_schedule(h_div_w)


def image_size(schedule: Schedule) -> tuple[int, int]:
    """(height, width) in pixels of the image an official schedule decodes to."""
    return INFINITY_SCHEDULES.image_size(schedule)


def tokens_per_scale(schedule: Schedule) -> list[int]:
    return [t * h * w for t, h, w in schedule]

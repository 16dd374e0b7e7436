"""Official scale schedules per aspect-ratio template and pixel budget."""

from __future__ import annotations

import pytest

from toprovar.errors import UserError
from toprovar.schedules import H_DIV_W_TEMPLATES, PIXEL_BUDGETS, image_size, nearest_template, scale_schedule


def test_square_1m_is_the_official_13_scales() -> None:
    grids = [h for _, h, w in scale_schedule(1.0, "1M")]
    assert grids == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert image_size(scale_schedule(1.0, "1M")) == (1024, 1024)
    assert image_size(scale_schedule(1.0, "0.25M")) == (512, 512)
    assert image_size(scale_schedule(1.0, "0.06M")) == (256, 256)


@pytest.mark.parametrize("template", H_DIV_W_TEMPLATES)
@pytest.mark.parametrize("pixels", sorted(PIXEL_BUDGETS))
def test_every_template_and_budget(template: float, pixels: str) -> None:
    schedule = scale_schedule(template, pixels)
    assert len(schedule) == PIXEL_BUDGETS[pixels]
    assert all(t == 1 for t, _, _ in schedule)
    assert schedule == scale_schedule(template, "1M")[: len(schedule)]  # budgets are prefixes
    _, h, w = schedule[-1]
    assert abs(h / w - template) < 0.01 * max(template, 1 / template)  # last grid has the ratio
    assert all(a[1] <= b[1] and a[2] <= b[2] for a, b in zip(schedule, schedule[1:]))


def test_transposed_templates() -> None:
    tall = scale_schedule(2.0, "1M")
    wide = scale_schedule(0.5, "1M")
    assert [(t, w, h) for t, h, w in tall] == wide


def test_nearest_template_and_errors() -> None:
    assert nearest_template(1.05) == 1.0 and nearest_template(0.49) == 0.5
    for bad in (0.0, -1.0, 7.0, float("nan"), "wide"):
        with pytest.raises(UserError, match="h_div_w"):
            nearest_template(bad)
    with pytest.raises(UserError, match="0.06M"):
        scale_schedule(1.0, "4M")

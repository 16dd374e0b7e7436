"""Pre-sampling on real generations of the random-weight test-small backbone."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from calibrate.backend import load_backend
from calibrate.presample import PresampleSummary, run_presample, write_tables
from calibrate.prompts import PromptSet
from calibrate.quality import ssim_per_image


@pytest.fixture(scope="module")
def result():
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=2)
    words = ["red", "blue", "green", "cube", "ball", "tree", "two", "small"]
    texts = [" ".join(random.sample(words, 3)) for _ in range(3)]
    seeds = [random.randrange(10**6) for _ in texts]
    prompts = PromptSet("presample", texts, seeds, texts)
    return backend, run_presample(backend, prompts, min_ssim=0.3), prompts


def test_tables_cover_every_scale_layer_and_prompt(result):
    backend, res, _ = result
    n_scales, depth = res.summary.scales, backend.depth
    assert len(res.scales) == n_scales and len(res.images) == 3 * n_scales
    grids = res.scales[["h", "w"]].to_numpy()
    assert len(res.layers) == depth * int((grids.min(axis=1) >= 2).sum())
    assert ((res.images.rho >= 0) & (res.images.rho <= 1)).all()
    assert (res.images[res.images.scale == n_scales - 1].exit_ssim == 1.0).all()
    assert (res.layers.ratio_median >= 1.0).all()  # σ1 >= σ2
    assert len(res.summary.layer_ratios) == depth
    lo, hi = res.summary.tau_range
    assert 0.0 <= lo < hi <= 1.0
    assert res.summary.crossing in ("below", "above")
    assert res.summary.guided  # test-small's default guidance scale is 3: the CFG-skip knob is searched


def test_early_exit_ssim_is_measured_against_the_full_image(result):
    _, res, _ = result
    stop = random.randrange(len(res.exit_images))
    expected = ssim_per_image(res.exit_images[stop], res.full_images).numpy()
    measured = res.images[res.images.scale == stop].sort_values("prompt").exit_ssim.to_numpy()
    np.testing.assert_allclose(measured, expected, rtol=1e-6)
    band = res.images[res.images.in_band]
    assert (band.exit_ssim >= 0.3).all() and (band.scale >= 1).all()
    assert res.summary.band_points == len(band)


def test_tables_round_trip(result, tmp_path):
    _, res, _ = result
    write_tables(res, tmp_path)
    for name, frame in (("scales", res.scales), ("images", res.images), ("layers", res.layers)):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / f"presample_{name}.parquet"), frame.reset_index(drop=True)
        )
        csv = pd.read_csv(tmp_path / f"presample_{name}.csv")
        np.testing.assert_allclose(
            csv.select_dtypes("number").to_numpy(), frame.select_dtypes("number").to_numpy(dtype=float), rtol=1e-9
        )
    summary = PresampleSummary.from_json(json.loads((tmp_path / "presample_summary.json").read_text()))
    assert summary == res.summary


def test_rho_is_recorded_at_every_probe_layer_count_the_search_may_pick(tmp_path):
    """Issue 23 item 7: beside the summary's ρ_s (at the policy's default probe count), ρ_s read from
    each other count the search may pick — the same values a pre-sampling at that count measures —
    while the summary, which the search space is made from, stays what it was. On `tiny` (12
    layers; test-small has 2, where only one probe layer can be protected)."""
    backend = load_backend({"name": "tiny"}, torch.device("cpu"), None, batch_size=2)
    texts = [f"a {random.choice(['red', 'blue'])} {random.choice(['cube', 'ball'])}" for _ in range(2)]
    prompts = PromptSet("presample", texts, [random.randrange(10**6) for _ in texts], texts)
    plain = run_presample(backend, prompts, min_ssim=0.3)
    counts = [1, 2, random.randint(3, backend.depth - 1), backend.depth]  # the depth itself: left out
    recorded = run_presample(backend, prompts, min_ssim=0.3, other_probe_layers=counts)
    assert recorded.summary == plain.summary  # the searched space is made from the same summary
    pd.testing.assert_frame_equal(recorded.images[plain.images.columns], plain.images)
    kept = sorted(set(counts[1:3]))
    assert sorted(recorded.probe_layers) == kept
    assert [c for c in recorded.images if c.startswith("rho_probe_")] == [f"rho_probe_{k}" for k in kept]
    for k in kept:
        at_k = run_presample(backend, prompts, min_ssim=0.3, probe_layers=k)
        np.testing.assert_array_equal(recorded.images[f"rho_probe_{k}"].to_numpy(), at_k.images.rho.to_numpy())
        assert recorded.probe_layers[k]["crossing"] == at_k.summary.crossing
        if at_k.summary.band_points:
            assert tuple(recorded.probe_layers[k]["tau_range"]) == at_k.summary.tau_range
    written = write_tables(recorded, tmp_path)
    assert tmp_path / "presample_probe_layers.json" in written
    assert json.loads((tmp_path / "presample_probe_layers.json").read_text()).keys() == {str(k) for k in kept}

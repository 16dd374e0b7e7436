"""The CPU cost model (calibrate.cost_model) on real traces of the random-weight test-small backbone."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from calibrate.cost_model import SCALE_TERMS, CostModel, fit_cost_model, prediction_error, scale_features
from toprovar.models.registry import build_backbone
from toprovar.pipeline import generate
from toprovar.policy import Policy, TokenStage, policy_from_dict


@pytest.fixture(scope="module")
def traces():
    backbone = build_backbone("test-small", device="cpu")
    prompts, seeds = ["a red cube", "two blue balls", "a tree"], [1, 2, 3]
    pruning = Policy(token=TokenStage(alpha_min=0.5, alpha_max=0.9, min_keep=0.2))
    # ρ_s is never below 0: "above" τ = 0 starts pruning at min_scale, the earliest scale it may.
    document = {
        "method": "toprovar",
        "scale": {"tau": 0.0, "crossing": "above", "min_scale": 1},
        "token": vars(pruning.token),
    }
    runs = {
        "unpruned": generate(backbone, prompts, seeds).trace,
        "entropy": generate(backbone, prompts, seeds, record_entropy=True).trace,
        "pruned": generate(backbone, prompts, seeds, policy=policy_from_dict(document)).trace,
        "cfg_skip": generate(
            backbone,
            prompts,
            seeds,
            policy=policy_from_dict({"method": "none", "guidance": {"skip_uncond_from_scale": 2}}),
        ).trace,
    }
    return backbone.spec, runs


def _with_times(trace, model: CostModel, spec):
    """A copy of `trace` whose scale times and decode are exactly the model's."""
    out = copy.deepcopy(trace)
    scales, features = scale_features(out, spec)
    per_scale = dict(zip(scales, features @ model.coefficients()))
    for record in out.scales:
        record.time_ms = per_scale.get(record.scale, float("nan"))
    out.decode_ms = model.decode * out.batch
    out.total_ms = sum(per_scale.values()) + out.decode_ms
    return out


def test_features_see_what_ran(traces):
    spec, runs = traces
    _, unpruned = scale_features(runs["unpruned"], spec)
    _, entropy = scale_features(runs["entropy"], spec)
    _, pruned = scale_features(runs["pruned"], spec)
    _, skipped = scale_features(runs["cfg_skip"], spec)
    col = {name: i for i, name in enumerate(SCALE_TERMS)}
    assert (unpruned[:, col["entropy"]] == 0).all() and (entropy[:, col["entropy"]] > 0).all()
    assert (unpruned[:, col["pruned"]] == 0).all() and pruned[:, col["pruned"]].sum() > 0
    assert pruned[:, col["linear"]].sum() < unpruned[:, col["linear"]].sum()
    # From scale 2 on the CFG skip runs half the rows: half the linear work and token rows.
    np.testing.assert_allclose(skipped[2:, col["linear"]], unpruned[2:, col["linear"]] / 2, rtol=1e-12)
    np.testing.assert_allclose(skipped[2:, col["token_rows"]], unpruned[2:, col["token_rows"]] / 2, rtol=1e-12)


def test_a_fit_reproduces_times_that_follow_a_model(traces):
    spec, runs = traces
    truth = CostModel(*[random.uniform(0.1, 5.0) for _ in SCALE_TERMS], decode=random.uniform(1.0, 50.0))
    timed = [_with_times(t, truth, spec) for t in runs.values()]
    fit = fit_cost_model(timed, spec, fitted_on="synthetic")
    assert fit.calls == len(timed) and fit.max_abs_error < 1e-6
    assert all(c >= 0 for c in fit.model.coefficients()) and fit.model.fitted_on == "synthetic"
    assert fit.model.decode == pytest.approx(truth.decode)
    for trace in timed:
        assert fit.model.predict_ms(trace, spec) == pytest.approx(trace.total_ms, rel=1e-6)


def test_more_work_never_predicts_less_time(traces):
    spec, runs = traces
    model = CostModel(*[random.uniform(0.0, 5.0) for _ in SCALE_TERMS], decode=random.uniform(0.0, 50.0))
    unpruned, pruned = model.predict_ms(runs["unpruned"], spec), model.predict_ms(runs["pruned"], spec)
    # A pruned block's gather costs time, so only the work terms can be compared directly.
    work = CostModel(**{**model.to_json(), "pruned": 0.0, "pruned_block": 0.0, "entropy": 0.0, "entropy_pass": 0.0})
    assert work.predict_ms(runs["pruned"], spec) <= work.predict_ms(runs["unpruned"], spec)
    assert model.predict_ms(runs["entropy"], spec) >= unpruned and pruned > 0


def test_the_model_round_trips_through_json():
    model = CostModel(*[random.uniform(0, 3) for _ in SCALE_TERMS], decode=2.5, fitted_on="x")
    assert CostModel.from_json(model.to_json()) == model
    assert prediction_error(2.2, 2.0) == pytest.approx(0.1)

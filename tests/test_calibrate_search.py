"""The Optuna search of `calibrate`: resume without lost or repeated trials, warm start, constraints.

The objective is real: generations of the random-weight `test-small` backbone through the pipeline,
pruned by the ToProVAR policy of each trial's parameters, scored by FLOP ratio and SSIM against
the unpruned images.
"""
from __future__ import annotations

import math
import random

import optuna
import pytest
import torch

from calibrate.backend import load_backend
from calibrate.config import ConstraintsConfig, LatencyConfig, SpaceConfig, StorageConfig
from calibrate.objective import PolicyScorer
from calibrate.policy_space import PolicyFactory, paper_defaults
from calibrate.presample import PresampleSummary
from calibrate.prompts import PromptSet
from calibrate.search import (SearchSpace, completed, feasible_front, open_study, run_search, violations)
from optuna.trial import TrialState


# A pre-sampling summary for the 2-layer, 7-scale test-small backbone: any valid ratios (>= 1) work.
SUMMARY = PresampleSummary(crossing="below", tau_range=(0.0, 1.0), representative_scale=3,
                           layer_ratios=[random.uniform(1.0, 3.0) for _ in range(2)], band_points=0,
                           prompts=0, scales=7)
build_test_policy = PolicyFactory(SUMMARY, "test-small")
NO_PRUNING = {"tau": 0.5, "beta": 1.0, "alpha_min": 0.0, "alpha_max": 0.0, "min_keep": 0.1, "min_scale": 1}
STRONG = {"tau": 1.0, "beta": 0.01, "alpha_min": 0.9, "alpha_max": 1.0, "min_keep": 0.05, "min_scale": 1}
DEFAULTS = paper_defaults()


@pytest.fixture(scope="module")
def backend():
    return load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=4)


@pytest.fixture(scope="module")
def scorer(backend):
    rng = random.Random()
    words = ["red", "blue", "cube", "ball", "two", "left", "tree", "cat"]
    texts = [" ".join(rng.sample(words, 3)) for _ in range(2)]
    seeds = [rng.randrange(10**6) for _ in texts]
    return PolicyScorer(backend, PromptSet("search", texts, seeds, texts), build_test_policy, cost="flops",
                        latency=LatencyConfig(), evaluator=None)


SPACE = SearchSpace.from_config(SpaceConfig(alpha_min=[0.0, 0.9]), tau_range=(0.0, 1.0), n_scales=7)
LIMITS = ConstraintsConfig(min_ssim=0.5)


class InterruptAfter:
    """Wraps an objective; raises KeyboardInterrupt (as Ctrl-C would) on call number `k + 1`."""

    def __init__(self, objective, k):
        self.objective, self.k, self.calls, self.seen = objective, k, 0, []

    def __call__(self, params):
        self.calls += 1
        if self.calls > self.k:
            raise KeyboardInterrupt
        self.seen.append(dict(params))
        return self.objective(params)


def test_scores_are_measured_from_generations(scorer):
    unpruned = scorer(NO_PRUNING)
    assert unpruned.speedup == pytest.approx(1.0)
    assert unpruned.ssim == pytest.approx(1.0, abs=1e-4)
    pruned = scorer(STRONG)
    assert pruned.speedup > 1.4  # one of the two layers keeps ~10 % of the tokens from scale 1 on
    assert pruned.ssim < 0.999
    assert pruned.extra["flops_executed"] < pruned.extra["flops_unpruned"]
    assert unpruned.extra["kept_share"] == 1.0 and pruned.extra["kept_share"] < 1.0
    assert pruned.extra["kept_share.s0"] == 1.0 and pruned.extra["D_mean"] == 1.0  # min_scale 1


def test_interrupted_study_resumes_without_lost_or_repeated_trials(tmp_path, scorer):
    storage = StorageConfig(url=f"sqlite:///{tmp_path / 'study.db'}")
    n_trials, k = 6, 3
    seed = random.randrange(1000)
    study = open_study("resume", storage, "tpe", seed, n_trials)
    interrupting = InterruptAfter(scorer, k)
    with pytest.raises(KeyboardInterrupt):
        run_search(study, SPACE, interrupting, n_trials=n_trials, limits=LIMITS,
                   warm_start=DEFAULTS)
    first = {t.number: (t.params, t.values) for t in completed(study)}
    assert len(first) == k
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["interrupted"]

    # A new process would do exactly this: open the same storage + name and run again.
    resumed = open_study("resume", storage, "tpe", seed, n_trials)
    ran = run_search(resumed, SPACE, scorer, n_trials=n_trials, limits=LIMITS,
                     warm_start=DEFAULTS)
    done = completed(resumed)
    assert ran == n_trials - k and len(done) == n_trials
    for number, (params, values) in first.items():  # finished trials kept as they were
        trial = resumed.trials[number]
        assert trial.state == TrialState.COMPLETE and trial.params == params and trial.values == values
    param_sets = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(param_sets)) == len(param_sets)  # nothing evaluated twice
    retried = [t for t in done if t.system_attrs.get("retry_of") == interrupted[0].number]
    assert len(retried) == 1 and retried[0].params == interrupted[0].params
    assert sum(bool(t.user_attrs.get("warm_start")) for t in resumed.trials) == 1

    # Running once more with the target met runs nothing.
    again = open_study("resume", storage, "tpe", seed, n_trials)
    assert run_search(again, SPACE, scorer, n_trials=n_trials, limits=LIMITS) == 0


def test_warm_start_constraints_and_ranking(scorer):
    study = open_study("mem", StorageConfig(url=None), "tpe", random.randrange(1000), 5)
    run_search(study, SPACE, scorer, n_trials=5, limits=LIMITS, warm_start=DEFAULTS)
    first = study.trials[0]
    assert first.user_attrs.get("warm_start") and first.params == pytest.approx(SPACE.clip(DEFAULTS))
    for trial in completed(study):
        metrics = trial.user_attrs["metrics"]
        assert trial.constraints == pytest.approx({"ssim": LIMITS.min_ssim - metrics["ssim"]})
        assert trial.values == pytest.approx([metrics["speedup"], metrics["ssim"]])
    front = feasible_front(study)
    feasible = [t for t in completed(study) if all(v <= 0 for v in t.constraints.values())]
    assert all(t.user_attrs["metrics"]["ssim"] >= LIMITS.min_ssim for t in front)
    assert [t.values[0] for t in front] == sorted((t.values[0] for t in front), reverse=True)
    assert all(a.values[1] < b.values[1] for a, b in zip(front, front[1:]))
    on_front = {t.number for t in front}
    assert on_front <= {t.number for t in feasible}
    for t in feasible:  # every feasible trial left out is matched or beaten on both objectives
        assert t.number in on_front or any(f.values[0] >= t.values[0] and f.values[1] >= t.values[1]
                                           for f in front)


def test_feasible_front_is_fastest_first_without_dominated_or_infeasible_trials():
    study = optuna.create_study(directions=["maximize", "maximize"])
    rows = [  # (speedup, ssim, feasible)
        (2.5, 0.95, False), (2.1, 0.90, True), (2.0, 0.93, True), (1.9, 0.92, True),
        (1.8, 0.96, True), (1.8, 0.91, True), (1.2, 0.99, True)]
    for speedup, ssim, ok in rows:
        study.add_trial(optuna.trial.create_trial(values=[speedup, ssim],
                                                  constraints={"geneval_drop": -0.01 if ok else 0.05}))
    order = [(t.values[0], t.values[1]) for t in feasible_front(study)]
    assert order == [(2.1, 0.90), (2.0, 0.93), (1.8, 0.96), (1.2, 0.99)]  # slower only for better SSIM


def test_space_keeps_alpha_order_and_clips_defaults():
    space = SearchSpace.from_config(SpaceConfig(alpha_min=[0.1, 0.5], alpha_max=[0.2, 0.9]), (0.3, 0.5), n_scales=5)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=random.randrange(1000)))
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial)
        assert params["alpha_min"] <= params["alpha_max"]
        assert 0.3 <= params["tau"] <= 0.5 and params["min_scale"] in range(1, 5)
        study.tell(trial, [0.0, 0.0])
    clipped = space.clip({"tau": 0.9, "beta": 100.0, "alpha_min": 0.6, "alpha_max": 0.3, "min_keep": 0.0,
                          "min_scale": 0})
    assert clipped["tau"] == 0.5 and clipped["alpha_min"] == 0.5 and clipped["alpha_max"] >= clipped["alpha_min"]
    assert clipped["min_scale"] == 1


def test_violations_include_geneval_only_when_scored():
    from calibrate.search import Scores

    ssim, drop = random.uniform(0.5, 1.0), random.uniform(-0.05, 0.05)
    limits = ConstraintsConfig(min_ssim=0.8, max_geneval_drop=0.01)
    assert violations(Scores(2.0, ssim), limits) == pytest.approx({"ssim": 0.8 - ssim})
    assert violations(Scores(2.0, ssim, drop), limits) == pytest.approx({"ssim": 0.8 - ssim,
                                                                          "geneval_drop": drop - 0.01})

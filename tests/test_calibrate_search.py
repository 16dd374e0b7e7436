"""The Optuna search of `calibrate`: resume without lost or repeated trials, warm start, constraints,
the knob table (config validation, space, defaults, policy), the samplers, and several workers on
one study (exactly n_trials COMPLETE, distinct trials, dead workers' trials queued again).

The objective is real: generations of the random-weight `test-small` backbone through the pipeline,
pruned by the ToProVAR policy of each trial's parameters, scored by FLOP ratio and SSIM against
the unpruned images. Configs are toprovar/conf/ composed by Hydra (`calibrate_config`), never hand-built.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from calibrate.backend import load_backend
from calibrate.config import SAMPLERS, ConstraintsConfig
from calibrate.knobs import CATEGORICAL, INT, KNOBS, PolicyFactory, SearchSpace, paper_defaults, policy_values
from calibrate.objective import PolicyScorer
from calibrate.presample import PresampleSummary
from calibrate.prompts import PromptSet
from calibrate.search import (
    MAX_RETRIES,
    Scores,
    completed,
    feasible_front,
    open_study,
    pareto_front,
    prepare_study,
    reclaim,
    run_search,
    this_worker,
    violations,
    worker_alive,
    worker_seed,
)
from toprovar.errors import UserError
from toprovar.policy import Policy

# A pre-sampling summary for the 2-layer, 7-scale test-small backbone: any valid ratios (>= 1) work.
SUMMARY = PresampleSummary(
    crossing="below",
    tau_range=(0.0, 1.0),
    representative_scale=3,
    layer_ratios=[random.uniform(1.0, 3.0) for _ in range(2)],
    band_points=0,
    prompts=0,
    scales=7,
)
build_test_policy = PolicyFactory(SUMMARY, "test-small")
NO_PRUNING = {"tau": 0.5, "beta": 1.0, "alpha_min": 0.0, "alpha_span": 0.0, "min_keep": 0.1, "min_scale": 1}
STRONG = {"tau": 1.0, "beta": 0.01, "alpha_min": 0.9, "alpha_span": 1.0, "min_keep": 0.05, "min_scale": 1}
DEFAULTS = paper_defaults()


@pytest.fixture(scope="module")
def config(calibrate_config):
    return calibrate_config(
        "backbone=test-small",
        "storage=memory",
        "tracking=off",
        "search.space.alpha_min=[0.0,0.9]",
        "search.constraints.min_ssim=0.5",
    )


@pytest.fixture(scope="module")
def backend():
    return load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=4)


def flops_scorer(backend, config, texts: list[str]) -> PolicyScorer:
    """A scorer of `build_test_policy`'s policies on `texts` (a random seed each, the texts their
    own geneval specs), by FLOPs, with no evaluator."""
    seeds = [random.randrange(10**6) for _ in texts]
    return PolicyScorer(
        backend,
        PromptSet("search", texts, seeds, texts),
        build_test_policy,
        cost="flops",
        latency=config.search.latency,
        evaluator=None,
    )


@pytest.fixture(scope="module")
def scorer(backend, config):
    words = ["red", "blue", "cube", "ball", "two", "left", "tree", "cat"]
    return flops_scorer(backend, config, [" ".join(random.sample(words, 3)) for _ in range(2)])


@pytest.fixture(scope="module")
def space(config):
    return SearchSpace.from_config(config.search.space, SUMMARY)


@pytest.fixture(scope="module")
def limits(config):
    return config.search.constraints


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


@pytest.mark.parametrize("url", ["journal:{}/study.journal", "sqlite:///{}/study.db"])
def test_interrupted_study_resumes_without_lost_or_repeated_trials(tmp_path, scorer, config, space, limits, url):
    storage = dataclasses.replace(config.storage, url=url.format(tmp_path))
    n_trials, k = 6, 3
    seed = random.randrange(1000)
    study = open_study("resume", storage, "tpe", seed, n_trials)
    assert prepare_study(study, space, warm_start=DEFAULTS, grace_s=60) == {"dead": 0, "interrupted": 0}
    interrupting = InterruptAfter(scorer, k)
    with pytest.raises(KeyboardInterrupt):
        run_search(study, space, interrupting, n_trials=n_trials, limits=limits)
    first = {t.number: (t.params, t.values) for t in completed(study)}
    assert len(first) == k
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["interrupted"]

    # A new process would do exactly this: open the same storage + name and run again.
    resumed = open_study("resume", storage, "tpe", seed, n_trials)
    assert prepare_study(resumed, space, warm_start=DEFAULTS, grace_s=60) == {"dead": 0, "interrupted": 1}
    ran = run_search(resumed, space, scorer, n_trials=n_trials, limits=limits)
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
    assert run_search(again, space, scorer, n_trials=n_trials, limits=limits) == 0


def test_warm_start_constraints_and_ranking(scorer, config, space, limits):
    study = open_study("mem", config.storage, "tpe", random.randrange(1000), 5)
    prepare_study(study, space, warm_start=DEFAULTS, grace_s=60)
    run_search(study, space, scorer, n_trials=5, limits=limits)
    first = study.trials[0]
    assert first.user_attrs.get("warm_start") and first.params == pytest.approx(space.clip(DEFAULTS))
    for trial in completed(study):
        metrics = trial.user_attrs["metrics"]
        assert trial.constraints == pytest.approx({"ssim": limits.min_ssim - metrics["ssim"]})
        assert trial.values == pytest.approx([metrics["speedup"], metrics["ssim"]])
    front = feasible_front(study)
    feasible = [t for t in completed(study) if all(v <= 0 for v in t.constraints.values())]
    assert all(t.user_attrs["metrics"]["ssim"] >= limits.min_ssim for t in front)
    assert [t.values[0] for t in front] == sorted((t.values[0] for t in front), reverse=True)
    assert all(a.values[1] < b.values[1] for a, b in zip(front, front[1:]))
    on_front = {t.number for t in front}
    assert on_front <= {t.number for t in feasible}
    for t in feasible:  # every feasible trial left out is matched or beaten on both objectives
        assert t.number in on_front or any(f.values[0] >= t.values[0] and f.values[1] >= t.values[1] for f in front)


def test_feasible_front_is_fastest_first_without_dominated_or_infeasible_trials():
    study = optuna.create_study(directions=["maximize", "maximize"])
    rows = [  # (speedup, ssim, feasible)
        (2.5, 0.95, False),
        (2.1, 0.90, True),
        (2.0, 0.93, True),
        (1.9, 0.92, True),
        (1.8, 0.96, True),
        (1.8, 0.91, True),
        (1.2, 0.99, True),
    ]
    for speedup, ssim, ok in rows:
        study.add_trial(
            optuna.trial.create_trial(values=[speedup, ssim], constraints={"geneval_drop": -0.01 if ok else 0.05})
        )
    order = [(t.values[0], t.values[1]) for t in feasible_front(study)]
    assert order == [(2.1, 0.90), (2.0, 0.93), (1.8, 0.96), (1.2, 0.99)]  # slower only for better SSIM


def test_random_params_are_seeded_policies_of_the_space(space):
    """The cost model's probe policies: the same seed draws the same policies, each inside the space."""
    from itertools import islice

    seed = random.randrange(10**6)
    drawn = list(islice(space.random_params(seed), 5))
    assert drawn == list(islice(space.random_params(seed), 5))
    assert drawn != list(islice(space.random_params(seed + 1), 5))
    for params in drawn:
        assert set(params) == {knob.name for knob in KNOBS} and space.clip(params) == params


def test_space_keeps_alpha_order_fixed_distributions_and_clips(calibrate_config):
    cfg = calibrate_config(
        "backbone=test-small",
        "search.space.alpha_min=[0.1,0.5]",
        "search.space.alpha_span=[0.2,0.9]",
        "search.space.order=[entropy,edge]",
    )
    space = SearchSpace.from_config(cfg.search.space, dataclasses.replace(SUMMARY, tau_range=(0.3, 0.5), scales=5))
    study = optuna.create_study(
        directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=random.randrange(1000))
    )
    distributions = None
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial)
        assert set(params) == {knob.name for knob in KNOBS}
        alpha_max = policy_values(params)["token.alpha_max"]
        assert alpha_max == pytest.approx(params["alpha_min"] + params["alpha_span"] * (1 - params["alpha_min"]))
        assert params["alpha_min"] <= alpha_max <= 1.0 and build_test_policy(params).token.alpha_max == alpha_max
        assert (
            0.3 <= params["tau"] <= 0.5
            and params["min_scale"] in range(1, 5)
            and params["order"] in ("entropy", "edge")
        )
        # One fixed distribution per knob: a sampler that models the knobs jointly sees one space.
        assert distributions is None or trial.distributions == distributions
        distributions = trial.distributions
        study.tell(trial, [0.0, 0.0])
    clipped = space.clip(
        {
            **DEFAULTS,
            "tau": 0.9,
            "beta": 1e3,
            "alpha_min": 0.6,
            "alpha_span": 0.0,
            "min_keep": 0.0,
            "min_scale": 0,
            "order": "frequency",
        }
    )
    assert clipped == {
        **clipped,
        "tau": 0.5,
        "beta": cfg.search.space["beta"][1],
        "alpha_min": 0.5,
        "alpha_span": 0.2,
        "min_keep": cfg.search.space["min_keep"][0],
        "min_scale": 1,
        "order": "entropy",
    }
    with pytest.raises(UserError, match="search.space.min_scale"):  # past the last of 5 scales
        SearchSpace.from_config({**cfg.search.space, "min_scale": [1, 5]}, dataclasses.replace(SUMMARY, scales=5))


@pytest.mark.parametrize("depth", [2, 3, 8])
def test_protect_layers_range_is_clipped_below_the_backbone_depth(calibrate_config, depth):
    """One YAML default ([1, 2]) for every backbone: a trial never protects every layer, which the
    policy check refuses (test-small-t5 has 2 layers)."""
    cfg = calibrate_config("backbone=test-small")
    space = SearchSpace.from_config(cfg.search.space, dataclasses.replace(SUMMARY, layer_ratios=[1.5] * depth))
    low, high = cfg.search.space["protect_layers"]
    assert space.ranges["protect_layers"] == (min(low, depth - 1), min(high, depth - 1))


def _field(policy, knob):
    return getattr(getattr(policy, knob.section), knob.field)


def test_knob_defaults_are_the_policy_defaults_and_any_value_within_limits_is_a_policy():
    default, built = Policy(), build_test_policy(DEFAULTS)
    for knob in KNOBS:
        assert _field(built, knob) == pytest.approx(_field(default, knob)), knob.name
        assert _field(build_test_policy({}), knob) == pytest.approx(_field(default, knob))  # missing: default
    for _ in range(40):  # the table's hard limits agree with the policy schema's
        params = {}
        for knob in KNOBS:
            if knob.kind == CATEGORICAL:
                params[knob.name] = random.choice(knob.limits)
                continue
            lo, hi = knob.limits
            hi = lo + 20 if hi is None else hi
            value = random.choice([lo, hi, random.uniform(lo, hi)])
            params[knob.name] = round(value) if knob.kind == INT else value
        policy = build_test_policy(params)
        assert policy.token.alpha_min <= policy.token.alpha_max


def test_params_of_studies_before_the_span_still_make_their_policy():
    """Trials of studies made before `alpha_span` name `alpha_max` itself: the shipped tiny policy
    comes out again from its own knob values and pre-sampling summary."""
    import yaml

    from toprovar.policy import POLICY_DIR, policy_from_dict

    shipped = yaml.safe_load((POLICY_DIR / "tiny.yaml").read_text())
    summary = PresampleSummary.from_json(shipped["provenance"]["presample"])
    old_params = {
        **{k.name: shipped[k.section][k.field] for k in KNOBS if k.name != "alpha_span" and k.section in shipped},
        "alpha_max": shipped["token"]["alpha_max"],
    }
    document = PolicyFactory(summary, "tiny").document(old_params)
    assert {section: document[section] for section in ("scale", "layer", "token")} == {
        section: shipped[section] for section in ("scale", "layer", "token")
    }
    alpha_min, alpha_max = shipped["token"]["alpha_min"], shipped["token"]["alpha_max"]
    new_params = {**old_params, "alpha_span": (alpha_max - alpha_min) / (1 - alpha_min)}
    assert policy_values(new_params)["token.alpha_max"] == pytest.approx(alpha_max)  # the span wins over alpha_max
    assert policy_from_dict(document).token == policy_from_dict({**shipped, "provenance": {}}).token
    assert document["guidance"] == shipped.get("guidance", {"skip_uncond_from_scale": None})
    older = {k: v for k, v in old_params.items() if k != "skip_uncond_from_scale"}
    guidance = PolicyFactory(summary, "tiny").document(older)["guidance"]
    assert guidance == {"skip_uncond_from_scale": None}  # a knob the study did not have: its default


def _tradeoff(params):
    """A smooth synthetic objective (no model): a stronger token gate is faster and loses quality."""
    values = policy_values(params)
    strength = (values["token.alpha_min"] + values["token.alpha_max"]) / 2
    return Scores(speedup=1.0 + strength + 0.1 * values["scale.tau"], ssim=1.0 - 0.6 * strength**2)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_models_every_knob_under_the_constraints(sampler, config, space, limits):
    n_trials = 10  # 3 start-up trials, then the sampler's own model
    study = open_study(f"{sampler}-joint", config.storage, sampler, random.randrange(1000), n_trials)
    independent, sample_independent = [], study.sampler.sample_independent

    def spy(study_, trial, name, distribution):
        if not distribution.single():  # one-value choices are fixed knobs, not modelled
            independent.append((trial.number, name))
        return sample_independent(study_, trial, name, distribution)

    study.sampler.sample_independent = spy
    prepare_study(study, space, warm_start=DEFAULTS, grace_s=60)
    run_search(study, space, _tradeoff, n_trials=n_trials, limits=limits)
    done = completed(study)
    assert len(done) == n_trials and all(t.distributions == done[0].distributions for t in done)
    if sampler != "random":  # every knob is in the space the sampler's model sees ...
        modelled = study.sampler.infer_relative_search_space(study, done[-1])
        varied = {k.name for k in KNOBS if len(set(space.ranges[k.name])) > 1}  # one-value ranges are fixed knobs
        assert set(modelled) == varied
    if sampler in ("tpe", "gp"):  # ... and after the start-up trials none falls back to independent sampling
        assert [(n, name) for n, name in independent if n >= 5] == []  # (NSGA-II mutates that way on purpose)
    front = feasible_front(study)
    assert front and {t.number for t in front} <= {t.number for t in pareto_front(study)}
    assert all(t.values[1] >= limits.min_ssim for t in pareto_front(study))


def test_violations_include_geneval_only_when_scored():
    ssim, drop = random.uniform(0.5, 1.0), random.uniform(-0.05, 0.05)
    limits = ConstraintsConfig(min_ssim=0.8, max_geneval_drop=0.01, max_clip_drop=1.5)
    assert violations(Scores(2.0, ssim), limits) == pytest.approx({"ssim": 0.8 - ssim})
    assert violations(Scores(2.0, ssim, drop), limits) == pytest.approx(
        {"ssim": 0.8 - ssim, "geneval_drop": drop - 0.01}
    )
    clip_drop = random.uniform(-3.0, 3.0)  # CLIPScore points, with quality.clip
    assert violations(Scores(2.0, ssim, extra={"clip_drop": clip_drop}), limits) == pytest.approx(
        {"ssim": 0.8 - ssim, "clip_drop": clip_drop - 1.5}
    )


# --- several workers on one study ----------------------------------------------------------------
def _params_key(trial):
    return tuple(sorted(trial.params.items()))


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_workers_sharing_a_journal_study_end_with_exactly_n_trials(tmp_path, config, space, limits, sampler):
    """Workers in threads, each with its own storage connection to one journal file, as processes
    would have: the study ends with exactly n_trials COMPLETE, all with distinct parameters, and a
    trial that lost the race for the last places is pruned before drawing any parameter."""
    storage = dataclasses.replace(config.storage, url=f"journal:{tmp_path}/study.journal")
    n_workers, n_trials, seed = random.randint(2, 4), random.randint(5, 9), random.randrange(1000)
    first = open_study("shared", storage, sampler, seed, n_trials)
    prepare_study(first, space, warm_start=DEFAULTS, grace_s=60)
    ran, errors = [0] * n_workers, []

    def slow_tradeoff(params):  # trials of uneven length, so workers finish out of step
        time.sleep(random.uniform(0.0, 0.05))
        return _tradeoff(params)

    def work(index):
        try:
            study = open_study("shared", storage, sampler, seed, n_trials, worker=index)
            ran[index] = run_search(
                study, space, slow_tradeoff, n_trials=n_trials, limits=limits, worker=index, progress=False
            )
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    trials = open_study("shared", storage, sampler, seed, n_trials).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n_trials == sum(ran)
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert all(t.user_attrs.get("surplus") and not t.params for t in trials if t.state == TrialState.PRUNED)
    assert len({_params_key(t) for t in done}) == n_trials  # no two trials evaluated the same policy
    assert sum(bool(t.user_attrs.get("warm_start")) for t in trials) == 1


def test_worker_seeds_differ_by_worker_and_by_resume():
    seed = random.randrange(10**6)
    seeds = {worker_seed(seed, worker, existing) for worker in range(8) for existing in range(8)}
    assert len(seeds) == 64 and worker_seed(seed, 1, 3) == worker_seed(seed, 1, 3)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_two_processes_opening_one_new_study_draw_different_trials(tmp_path, config, space, sampler):
    """Worker 0 of two calibrations (or a machine joining with stages=[search]) on one new study: only
    the one that created the study draws from the seed alone (a fresh calibration is reproducible);
    the other mixes in its host and pid, so it does not replay the first one's trials."""
    seed = random.randrange(1000)

    def first_params(study):
        trial = study.ask()
        return space.suggest(trial)

    storage = dataclasses.replace(config.storage, url=f"journal:{tmp_path}/a.journal")
    creator, joiner = (open_study("one", storage, sampler, seed, 10) for _ in range(2))
    assert first_params(creator) != first_params(joiner)
    again = open_study(
        "one", dataclasses.replace(config.storage, url=f"journal:{tmp_path}/b.journal"), sampler, seed, 10
    )
    assert first_params(again) == creator.trials[0].params  # the creator's draws follow the seed


def _dead_worker():
    """The record of a process of this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return {**this_worker(), "pid": process.pid}


def test_trials_of_dead_workers_are_failed_and_queued_once(tmp_path, config, space):
    storage = dataclasses.replace(config.storage, url=f"journal:{tmp_path}/study.journal")
    study = open_study("reclaim", storage, "random", random.randrange(1000), 5)
    owners = {
        "dead": _dead_worker(),
        "alive": this_worker(),
        "other host": {**this_worker(), "host": "elsewhere"},
        "none": None,
    }
    assert worker_alive(owners["dead"]) is False and worker_alive(owners["alive"]) is True
    assert worker_alive(owners["other host"]) is None
    running = {}
    for name, owner in owners.items():
        trial = study.ask()
        if owner is not None:
            trial.set_user_attr("worker", owner)
        running[name] = (trial.number, space.suggest(trial))
    assert reclaim(study, grace_s=60) == 1  # the dead worker's; the unowned trial is younger than the grace
    states = {name: study.trials[number].state for name, (number, _) in running.items()}
    assert states == {
        "dead": TrialState.FAIL,
        "alive": TrialState.RUNNING,
        "other host": TrialState.RUNNING,
        "none": TrialState.RUNNING,
    }
    time.sleep(1.1)
    assert reclaim(study, grace_s=1) == 1  # a trial that named no worker for the grace period
    assert study.trials[running["none"][0]].state == TrialState.FAIL
    assert reclaim(study, grace_s=1) == 0  # nothing twice
    retries = {t.system_attrs["replaces"]: t for t in study.trials if t.state == TrialState.WAITING}
    assert set(retries) == {running["dead"][0], running["none"][0]}
    for name in ("dead", "none"):
        number, params = running[name]
        assert retries[number].system_attrs["fixed_params"] == params
        assert retries[number].system_attrs["retry_of"] == number


def test_a_retry_whose_worker_dies_too_is_queued_at_most_max_retries_times(tmp_path, config, space):
    storage = dataclasses.replace(config.storage, url=f"journal:{tmp_path}/study.journal")
    study = open_study("chain", storage, "random", random.randrange(1000), 5)
    trial = study.ask()
    trial.set_user_attr("worker", _dead_worker())
    params = space.suggest(trial)
    original = trial.number
    for attempt in range(1, MAX_RETRIES + 1):
        assert reclaim(study, grace_s=60) == 1
        trial = study.ask()  # pops the queued retry
        frozen = study.trials[trial.number]
        assert frozen.system_attrs["retry_of"] == original and frozen.system_attrs["retries"] == attempt
        trial.set_user_attr("worker", _dead_worker())
        assert space.suggest(trial) == params
    assert reclaim(study, grace_s=60) == 0  # out of retries
    assert [t.state for t in study.trials] == [TrialState.FAIL] * (MAX_RETRIES + 1)


def test_a_trial_that_loses_the_race_for_the_last_place_is_pruned_unsampled(
    tmp_path, config, space, limits, monkeypatch
):
    """Two workers counted n_trials - 1 at the same moment and both asked: the later trial (higher
    number) finds the target met by the trials ahead of it and is pruned before drawing parameters."""
    import calibrate.search as search

    storage = dataclasses.replace(config.storage, url=f"journal:{tmp_path}/study.journal")
    n_trials = random.randint(1, 4)
    study = open_study("race", storage, "random", random.randrange(1000), n_trials)
    run_search(study, space, _tradeoff, n_trials=n_trials - 1, limits=limits, progress=False)
    other = open_study("race", storage, "random", random.randrange(1000), n_trials, worker=1)
    theirs = other.ask()  # the other worker's trial, asked after both counted
    theirs.set_user_attr("worker", this_worker())
    counts, stale = search._counts, iter([(n_trials - 1, 0)] * 2)  # at the start and before asking
    monkeypatch.setattr(search, "_counts", lambda s: next(stale, None) or counts(s))

    def finish_theirs():  # the other worker completes its trial a moment later
        time.sleep(0.5)
        scores = _tradeoff(space.suggest(theirs))
        other.tell(theirs, [scores.speedup, scores.ssim])

    thread = threading.Thread(target=finish_theirs)
    thread.start()
    assert run_search(study, space, _tradeoff, n_trials=n_trials, limits=limits, progress=False) == 0
    thread.join()
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * n_trials + [TrialState.PRUNED]
    assert study.trials[-1].user_attrs["surplus"] and not study.trials[-1].params

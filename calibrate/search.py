"""The Optuna study: multi-objective (speedup ↑, quality ↑) under quality constraints, resumable.

Storage is any Optuna storage URL (SQLite in the run folder by default), so several workers can
join one study and an interrupted study picks up where it stopped:

* the target is a number of COMPLETE trials; a resumed or joining worker runs only what is left
  (`MaxTrialsCallback` counts finished trials across all workers);
* the paper-default trial is enqueued once per study (`skip_if_exists`);
* a trial interrupted in this process (Ctrl-C) is marked FAIL by Optuna and tagged `interrupted`;
  the next run re-queues its parameters once, so it is rerun cleanly and never counted twice;
* a trial whose worker died (no heartbeat for `grace_period_s`, RDB storages) is failed and
  re-queued by Optuna's `RetryHeartbeatStaleTrialCallback`.

Constraints are set on each trial (`trial.set_constraint`), which the TPE, NSGA-II and GP samplers
and `study.best_trials` (the Pareto fronts below) take into account. After each trial the MLflow
parent run gets `best_feasible_speedup` at step = trial number.

Evaluating a trial is a callable `params -> Scores` (calibrate.objective builds it from real
generations); this module knows nothing about models.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState, create_trial
from tqdm.auto import tqdm

from calibrate.config import ConstraintsConfig, StorageConfig
from calibrate.knobs import SearchSpace
from calibrate.tracking import NullTracker, Tracker
from toprovar.errors import UserError

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "maximize")  # (speedup, quality)
OBJECTIVE_NAMES = ("speedup", "ssim")


@dataclass(frozen=True)
class Scores:
    """What one policy measured on a prompt set against the unpruned run of the same prompts."""

    speedup: float                       # unpruned cost / executed cost (FLOPs or latency)
    ssim: float                          # mean SSIM against the unpruned images
    geneval_drop: float | None = None    # unpruned score - policy score (None: no evaluator)
    extra: dict[str, float] = field(default_factory=dict)
    images: Any = field(default=None, repr=False, compare=False)  # the policy's images (N, H, W, 3) uint8

    def metrics(self) -> dict[str, float]:
        out = {"speedup": self.speedup, "ssim": self.ssim, **self.extra}
        if self.geneval_drop is not None:
            out["geneval_drop"] = self.geneval_drop
        return out


def violations(scores: Scores, limits: ConstraintsConfig) -> dict[str, float]:
    """Optuna constraint values by name: feasible when every value is <= 0."""
    values = {"ssim": limits.min_ssim - scores.ssim}
    if scores.geneval_drop is not None:
        values["geneval_drop"] = scores.geneval_drop - limits.max_geneval_drop
    if "clip_drop" in scores.extra:  # CLIPScore (quality.clip)
        values["clip_drop"] = scores.extra["clip_drop"] - limits.max_clip_drop
    return values


def is_feasible(trial: FrozenTrial) -> bool:
    return (trial.state == TrialState.COMPLETE and bool(trial.constraints)
            and all(v <= 0 for v in trial.constraints.values()))


# --- study -------------------------------------------------------------------------------------
def _sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    """The sampler `search.sampler` names (calibrate.config.SAMPLERS). All of them read the
    constraints set with `trial.set_constraint` (random ignores them). TPE models the knobs jointly
    (multivariate, grouped), as NSGA-II and the Gaussian-process sampler do."""
    startup = max(3, min(10, n_trials // 3))
    with warnings.catch_warnings():  # multivariate/group TPE are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, n_trials // 3)))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def _storage(cfg: StorageConfig):
    if cfg.url is None:
        return None
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they are what resume needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(cfg.url, heartbeat_interval=cfg.heartbeat_interval_s, grace_period=cfg.grace_period_s,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as err:  # sqlalchemy raises many kinds for bad URLs / unreachable databases
        raise UserError(f"cannot open Optuna storage storage.url={cfg.url!r}: {str(err).splitlines()[0]}") from None


def open_study(name: str, storage: StorageConfig, sampler: str, seed: int, n_trials: int) -> optuna.Study:
    """Create the study, or load it when `name` already exists in the storage (resume / join)."""
    backend = _storage(storage)
    try:
        existing = 0
        if backend is not None and name in {s.study_name for s in optuna.get_all_study_summaries(backend)}:
            existing = len(optuna.load_study(study_name=name, storage=backend).trials)
        # Offset the seed by the trials already there, so a resumed or joining worker does not
        # replay the random start-up trials of the first one.
        return optuna.create_study(study_name=name, storage=backend, directions=list(DIRECTIONS),
                                   sampler=_sampler(sampler, seed + existing, n_trials),
                                   load_if_exists=True)
    except ValueError as err:  # e.g. an existing study with other directions
        raise UserError(f"study {name!r} in {storage.url!r} cannot be used: {err}; pick another study_name") from None


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue once more the parameters of trials this app interrupted (Ctrl-C) that never finished."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("retry_of") for t in trials}
    done = [t.system_attrs.get("fixed_params", t.params) for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)]
    count = 0
    for trial in trials:
        if (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")
                and trial.number not in retried and trial.params and trial.params not in done):
            study.add_trial(create_trial(state=TrialState.WAITING,
                                         system_attrs={"fixed_params": trial.params, "retry_of": trial.number}))
            count += 1
    return count


Evaluate = Callable[[dict[str, float]], Scores]


def run_search(study: optuna.Study, space: SearchSpace, evaluate: Evaluate, *, n_trials: int,
               limits: ConstraintsConfig, warm_start: Mapping[str, float] | None = None,
               tracker: Tracker | NullTracker | None = None, timeout_s: float | None = None) -> int:
    """Run trials until the study holds `n_trials` COMPLETE ones; returns how many ran here."""
    tracker = tracker or NullTracker()
    if warm_start is not None:
        study.enqueue_trial(space.clip(warm_start), user_attrs={"warm_start": True}, skip_if_exists=True)
    requeued = requeue_interrupted(study)
    remaining = n_trials - len(completed(study))
    if remaining <= 0:
        log.info("study %r already has %d complete trials; nothing to run", study.study_name, n_trials)
        return 0
    log.info("study %r: %d complete, running %d more (%d re-queued after an interruption)",
             study.study_name, n_trials - remaining, remaining, requeued)

    bar = tqdm(total=remaining, desc="search", unit="trial", dynamic_ncols=True)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = space.suggest(trial)
        run_id = tracker.start_child(f"trial-{trial.number}", {**params, "trial": trial.number})
        try:
            scores = evaluate(params)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            tracker.end(run_id, ok=False)
            raise
        except BaseException:
            tracker.end(run_id, ok=False)
            raise
        if not (math.isfinite(scores.speedup) and math.isfinite(scores.ssim)):
            raise RuntimeError(f"trial {trial.number} measured non-finite scores {scores}")
        limits_values = violations(scores, limits)
        for name, value in limits_values.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("metrics", scores.metrics())
        trial.set_user_attr("mlflow_run_id", run_id)
        feasible = all(v <= 0 for v in limits_values.values())
        tracker.log_metrics(run_id, {**scores.metrics(), "feasible": float(feasible)})
        tracker.end(run_id)
        bar.set_postfix(speedup=f"{scores.speedup:.2f}", ssim=f"{scores.ssim:.3f}", ok=feasible)
        return scores.speedup, scores.ssim

    ran = 0

    def count(_study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        bar.update(1)
        front = feasible_front(_study)
        if front and tracker.parent_id:  # the search's progress, one point per trial
            tracker.log_metrics(tracker.parent_id, {"best_feasible_speedup": front[0].values[0]}, step=trial.number)

    try:
        study.optimize(objective, n_trials=remaining, timeout=timeout_s, gc_after_trial=False,
                       callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,)), count])
    finally:
        bar.close()
    return ran


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's Pareto front (`study.best_trials`): complete trials, and in a study with constraints
    only those meeting every one (all values <= 0)."""
    return study.best_trials


def feasible_front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front (speedup, SSIM) of the feasible complete trials, fastest first; along it
    SSIM rises strictly as speedup falls (a slower trial is on it only if its SSIM is higher).
    Trials with the same scores (e.g. several that prune nothing) appear once, the earliest."""
    front, seen = [], set()
    for trial in sorted(pareto_front(study), key=lambda t: (-t.values[0], -t.values[1], t.number)):
        if tuple(trial.values) not in seen:
            seen.add(tuple(trial.values))
            front.append(trial)
    return front


def trials_frame(study: optuna.Study):
    """All trials as a pandas DataFrame with their metrics and feasibility."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name,
                     **{f"param.{k}": v for k, v in t.params.items()},
                     **{f"metric.{k}": v for k, v in t.user_attrs.get("metrics", {}).items()},
                     "feasible": is_feasible(t), "warm_start": bool(t.user_attrs.get("warm_start")),
                     "retry_of": t.system_attrs.get("retry_of", t.system_attrs.get("failed_trial"))})
    return pd.DataFrame(rows)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    return {"number": trial.number, "params": dict(trial.params),
            "metrics": dict(trial.user_attrs.get("metrics", {})), "feasible": is_feasible(trial)}

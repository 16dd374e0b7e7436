"""The Optuna study: multi-objective (speedup ↑, quality ↑) under quality constraints, shared by
any number of workers, resumable.

The storage is the coordination (docs/calibration.md, "Several workers"): every worker — this
process, its child processes on the other GPUs (calibrate.workers), or processes on other
machines — opens the same study and adds trials to it; nothing else connects them.

* Storage: a journal file (`journal:<path>`, Optuna's JournalStorage with its file lock; the
  default, in the run folder) for workers on one host, any RDB URL (PostgreSQL) across hosts.
* Exactly `n_trials` COMPLETE trials: before asking for a trial a worker counts the COMPLETE and
  RUNNING ones and waits while they reach the target (a running trial may still fail); a trial
  that finds the target met by the trials ahead of it (lower numbers: another worker asked at the
  same moment) is pruned before it draws any parameter (user attr `surplus`).
  (`MaxTrialsCallback` counts after each trial, so N workers overshot by up to N-1.)
* Workers and their trials: each trial records its worker (host, pid, process start time). A
  RUNNING trial whose worker is gone from this host, or that named no worker within
  `grace_period_s`, is failed and queued once more by the next worker that looks; on RDB
  storages Optuna's heartbeats do the same for workers on other hosts. A trial interrupted
  here (Ctrl-C, SIGTERM) is tagged `interrupted` and queued once more by the next calibration.
  A retry keeps its original's parameters (system attr `retry_of`), at most `MAX_RETRIES` times.
* Distinct trials: each worker's sampler is seeded from (seed, worker index, trials already in
  the study), so workers and resumed runs do not replay each other's random start-up trials, and
  TPE's constant liar keeps a worker away from the points other workers are evaluating.
* The paper-default trial is enqueued once per study, by the process that prepares the study.

Constraints are set on each trial (`trial.set_constraint`), which the TPE, NSGA-II and GP samplers
and `study.best_trials` (the Pareto fronts below) take into account. After each trial the MLflow
parent run gets `best_feasible_speedup` at step = trial number.

Evaluating a trial is a callable `params -> Scores` (calibrate.objective builds it from real
generations); this module knows nothing about models.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, fail_stale_trials
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial
from tqdm.auto import tqdm

from calibrate.config import ConstraintsConfig, StorageConfig
from calibrate.knobs import SearchSpace
from calibrate.locks import schema_lock
from calibrate.storage_url import journal_path
from calibrate.tracking import NullTracker, Tracker
from toprovar.errors import UserError

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "maximize")  # (speedup, quality)
OBJECTIVE_NAMES = ("speedup", "ssim")
MAX_RETRIES = 2  # a trial whose worker died or was interrupted runs at most this many times more
POLL_S = 2.0  # how often a worker that waits for other workers' trials looks again


@dataclass(frozen=True)
class Scores:
    """What one policy measured on a prompt set against the unpruned run of the same prompts."""

    speedup: float  # the search objective: unpruned cost / policy cost (predicted time, FLOPs or latency)
    ssim: float  # mean SSIM against the unpruned images
    geneval_drop: float | None = None  # unpruned score - policy score (None: no evaluator)
    extra: dict[str, float] = field(default_factory=dict)
    images: Any = field(default=None, repr=False, compare=False)  # the policy's images (N, H, W, 3) uint8

    @property
    def wall_speedup(self) -> float | None:
        """Measured: unpruned generation time / the policy's on the same prompts (None: not timed)."""
        return self.extra.get("wall_speedup")

    def speedups(self) -> str:
        """The three speedups side by side, for a log line: measured wall clock first."""
        parts = [] if self.wall_speedup is None else [f"wall clock {self.wall_speedup:.2f}×"]
        if "predicted_speedup" in self.extra:
            parts.append(f"predicted {self.extra['predicted_speedup']:.2f}×")
        parts.append(f"FLOPs {self.extra.get('flop_speedup', float('nan')):.2f}×")
        return ", ".join(parts)

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
    return (
        trial.state == TrialState.COMPLETE
        and bool(trial.constraints)
        and all(v <= 0 for v in trial.constraints.values())
    )


# --- study -------------------------------------------------------------------------------------
def _sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    """The sampler `search.sampler` names (calibrate.config.SAMPLERS). All of them read the
    constraints set with `trial.set_constraint` (random ignores them). TPE models the knobs jointly
    (multivariate, grouped), as NSGA-II and the Gaussian-process sampler do; its constant liar
    treats other workers' running trials as bad results, so workers spread out (no effect with
    one worker: only other trials' RUNNING state counts)."""
    startup = max(3, min(10, n_trials // 3))
    with warnings.catch_warnings():  # multivariate/group TPE and the constant liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
            )
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, n_trials // 3)))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def open_storage(cfg: StorageConfig):
    """The Optuna storage `cfg.url` names (None: in memory); UserError when it cannot be opened."""
    if cfg.url is None:
        return None
    path = journal_path(cfg.url)
    try:
        if path is not None:
            if not path.name:
                raise ValueError("the journal URL names no file")
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        return _rdb_storage(cfg)
    except Exception as err:  # sqlalchemy raises many kinds for bad URLs / unreachable databases
        message = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if isinstance(err, ImportError) and cfg.url.startswith("postgresql"):
            hint = "; PostgreSQL needs its driver (psycopg 3): pip install -e '.[postgres]'"
        raise UserError(f"cannot open Optuna storage storage.url={cfg.url!r}: {message}{hint}") from None


def _rdb_storage(cfg: StorageConfig, attempts: int = 3) -> RDBStorage:
    """Optuna's RDB storage with heartbeats. Workers that open a new PostgreSQL database at the same
    moment race in CREATE TABLE IF NOT EXISTS (PostgreSQL answers one of them with a unique
    violation on its catalog): the loser tries again and finds the tables made."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings(), schema_lock(cfg.url):  # a new SQLite file: one process makes its tables
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    cfg.url,
                    heartbeat_interval=cfg.heartbeat_interval_s,
                    grace_period=cfg.grace_period_s,
                    heartbeat_stale_trial_callback=requeue,
                )
        except (IntegrityError, OperationalError, ProgrammingError):  # a schema race on a server database
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def worker_seed(seed: int, worker: int, existing: int, salt: int = 0) -> int:
    """The sampler seed of one worker: distinct per (seed, worker index, trials in the study when it
    opened, salt), so neither a second worker nor a resumed run replays another's random trials."""
    return int(np.random.SeedSequence([seed, worker, existing, salt]).generate_state(1)[0])


def _process_salt() -> int:
    """A number of this host and process, for the seed of a worker that did not create the study."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) + 1


def open_study(
    name: str, storage: StorageConfig, sampler: str, seed: int, n_trials: int, worker: int = 0
) -> optuna.Study:
    """Create the study, or load it when `name` already exists in the storage (resume / join).

    The process that creates the study (the storage decides: one creation succeeds) seeds its
    sampler from `seed` and `worker` alone, so a fresh calibration is reproducible; every other
    (a worker joining from another process or machine, where its index is 0 too, or a second
    calibration started at the same moment on the same study) also mixes in its host and pid."""
    backend = open_storage(storage) or optuna.storages.InMemoryStorage()
    try:
        optuna.create_study(study_name=name, storage=backend, directions=list(DIRECTIONS))
        salt = 0
    except optuna.exceptions.DuplicatedStudyError:
        salt = _process_salt()
    existing = len(optuna.load_study(study_name=name, storage=backend).trials)
    study = optuna.load_study(
        study_name=name, storage=backend, sampler=_sampler(sampler, worker_seed(seed, worker, existing, salt), n_trials)
    )
    if [d.name for d in study.directions] != [d.upper() for d in DIRECTIONS]:
        raise UserError(
            f"study {name!r} in {storage.url!r} cannot be used: it has directions "
            f"{[d.name.lower() for d in study.directions]}, calibration needs {list(DIRECTIONS)}; "
            f"pick another study_name"
        )
    return study


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# --- workers and their trials ------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc), so a reused pid is told apart;
    None when no such process runs. Without /proc: "?" for any live pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def this_worker() -> dict[str, Any]:
    """The record a trial keeps of the process that runs it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def worker_alive(record: Mapping[str, Any]) -> bool | None:
    """Whether the process a trial names still runs; None when it ran on another host."""
    if record.get("host") != socket.gethostname():
        return None
    started = _process_start(int(record["pid"]))
    return started is not None and (started == "?" or started == record.get("started"))


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue the parameters of a trial that did not finish (its worker died or was interrupted) once
    more; the retry names the original (`retry_of`) and the trial it replaces (`replaces`). False
    when the trial drew no parameters (a fresh trial takes its place) or ran out of retries.
    Also Optuna's heartbeat-stale callback on RDB storages."""
    original = trial.system_attrs.get("retry_of", trial.number)
    retries = trial.system_attrs.get("retries", 0) + 1
    if not trial.params:
        return False
    if retries > MAX_RETRIES:
        log.warning(
            "trial %d (retry %d of trial %d) did not finish either; not queued again",
            trial.number,
            retries - 1,
            original,
        )
        return False
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            system_attrs={
                "fixed_params": dict(trial.params),
                "retry_of": original,
                "replaces": trial.number,
                "retries": retries,
            },
        )
    )
    log.info(
        "trial %d did not finish (%s); its parameters are queued again",
        trial.number,
        "interrupted" if trial.user_attrs.get("interrupted") else "its worker stopped",
    )
    return True


def _fail(study: optuna.Study, number: int) -> bool:
    """Mark a RUNNING trial FAIL; False when another process finished it first."""
    try:
        study.tell(number, state=TrialState.FAIL)
        return True
    except (ValueError, RuntimeError, UpdateFinishedTrialError):
        return False


def reclaim(study: optuna.Study, grace_s: float) -> int:
    """Fail and queue again the RUNNING trials whose worker is gone: a process of this host that no
    longer runs, a trial that named no worker within `grace_s` (its worker died right after asking),
    or, on RDB storages, a worker on any host that stopped beating (Optuna's heartbeats). Cheap
    enough to run before every trial. Returns how many trials it queued again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # RDB heartbeats; `requeue` is the storage's stale-trial callback
    count, now = 0, dt.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is not None:
            dead = worker_alive(worker) is False
        else:
            dead = trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > grace_s
        if dead and _fail(study, trial.number):
            count += requeue(study, study.trials[trial.number])
    return count


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue once more the parameters of trials this app interrupted (Ctrl-C) that never finished."""
    trials = study.get_trials(deepcopy=False)
    # `replaces` names the trial a retry stands for; studies of earlier versions kept it in `retry_of`.
    retried = {t.system_attrs.get(key) for t in trials for key in ("replaces", "retry_of", "failed_trial")}
    return sum(
        requeue(study, t)
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried
    )


def prepare_study(
    study: optuna.Study, space: SearchSpace, *, warm_start: Mapping[str, float] | None, grace_s: float
) -> dict[str, int]:
    """Once per calibration, before its workers start: queue the paper-default trial (once per
    study) and the trials a crash or an interruption left unfinished. Returns what it queued."""
    if warm_start is not None:
        study.enqueue_trial(space.clip(warm_start), user_attrs={"warm_start": True}, skip_if_exists=True)
    queued = {"dead": reclaim(study, grace_s), "interrupted": requeue_interrupted(study)}
    done = len(completed(study))
    if done or any(queued.values()):
        log.info(
            "study %r: %d complete trials kept; queued again: %d whose worker died, %d interrupted",
            study.study_name,
            done,
            queued["dead"],
            queued["interrupted"],
        )
    return queued


# --- running trials ----------------------------------------------------------------------------
def hold_for_crash_test(point: str, worker: int = 0) -> None:
    """Test hook (tests/test_calibrate_crash.py, test_calibrate_workers.py): with the environment
    variable CALIBRATE_TEST_HOLD naming `point` (presample, trial, validate, export), the process
    writes its pid to $CALIBRATE_TEST_HOLD_DIR/<point>-<worker>.pid the first time it gets there
    and waits until that file is deleted — so a test kills it at a known point, or lets it go on."""
    if os.environ.get("CALIBRATE_TEST_HOLD") != point:
        return
    marker = Path(os.environ["CALIBRATE_TEST_HOLD_DIR"]) / f"{point}-{worker}.pid"
    held = Path(f"{marker}.held-by-{os.getpid()}")
    if held.exists():  # once per process and point
        return
    held.touch()
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.05)


def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    return done, len(trials) - done


def _ahead(study: optuna.Study, number: int) -> int:
    """COMPLETE trials plus RUNNING trials with a lower number: the trials that come before `number`."""
    return sum(
        t.state == TrialState.COMPLETE or t.number < number
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if t.number != number
    )


class _StudyProgress:
    """A progress bar of the study's COMPLETE trials (every worker's), refreshed from the storage."""

    def __init__(self, study: optuna.Study, n_trials: int, enabled: bool):
        self.study, self.bar, self.stop = study, None, threading.Event()
        if enabled:
            self.bar = tqdm(
                total=n_trials,
                initial=min(n_trials, len(completed(study))),
                desc="search",
                unit="trial",
                dynamic_ncols=True,
            )
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def refresh(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.n = min(self.bar.total, len(completed(self.study)))
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            self.bar.refresh()

    def _poll(self) -> None:
        while not self.stop.wait(POLL_S * 2):
            try:
                self.refresh()
            except Exception:  # the storage is busy or gone: the next trial refreshes the bar anyway
                pass

    def close(self) -> None:
        if self.bar is not None:
            self.stop.set()
            self.thread.join()
            self.refresh()
            self.bar.close()


Evaluate = Callable[[dict[str, float]], Scores]


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Evaluate,
    *,
    n_trials: int,
    limits: ConstraintsConfig,
    tracker: Tracker | NullTracker | None = None,
    timeout_s: float | None = None,
    grace_s: float = 60.0,
    worker: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Run trials in this process until the study holds `n_trials` COMPLETE ones, counting every
    worker's (see the module docstring); returns how many completed here. Stops early after
    `timeout_s` or when `should_stop()` says so (checked between trials)."""
    tracker = tracker or NullTracker()
    me = this_worker()
    done, running = _counts(study)
    if done >= n_trials:
        log.info("study %r already has %d complete trials; nothing to run", study.study_name, done)
        return 0
    log.info(
        "study %r: %d complete, %d running elsewhere; worker %d runs trials until %d are complete",
        study.study_name,
        done,
        running,
        worker,
        n_trials,
    )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", me)
        if _ahead(study, trial.number) >= n_trials:  # another worker asked at the same moment
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study has its {n_trials} trials without trial {trial.number}")
        params = space.suggest(trial)
        run_id = tracker.start_child(f"trial-{trial.number}", {**params, "trial": trial.number})
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            hold_for_crash_test("trial", worker)
            scores = evaluate(params)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            tracker.end(run_id, status="KILLED")
            raise
        except BaseException:
            tracker.end(run_id, status="FAILED")
            raise
        if not (math.isfinite(scores.speedup) and math.isfinite(scores.ssim)):
            raise RuntimeError(f"trial {trial.number} measured non-finite scores {scores}")
        limits_values = violations(scores, limits)
        for name, value in limits_values.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("metrics", scores.metrics())
        feasible = all(v <= 0 for v in limits_values.values())
        tracker.log.metrics(run_id, {**scores.metrics(), "feasible": float(feasible)})
        tracker.end(run_id)
        bar.refresh(speedup=f"{scores.speedup:.2f}", ssim=f"{scores.ssim:.3f}", ok=feasible)
        log.info(
            "trial %d: speedup %.3f, SSIM %.4f, %s",
            trial.number,
            scores.speedup,
            scores.ssim,
            "feasible" if feasible else "infeasible",
        )
        return scores.speedup, scores.ssim

    ran = 0

    def count(_study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        if trial.state != TrialState.COMPLETE:
            return
        ran += 1
        front = feasible_front(_study)
        if front and tracker.parent_id:  # the search's progress, one point per trial
            tracker.log.metrics(tracker.parent_id, {"best_feasible_speedup": front[0].values[0]}, step=trial.number)

    started, waiting = time.monotonic(), False
    bar = _StudyProgress(study, n_trials, progress)
    try:
        while True:
            reclaim(study, grace_s)
            done, running = _counts(study)
            if done >= n_trials or (should_stop is not None and should_stop()):
                break
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                log.info("search.timeout_s=%s reached; worker %d stops", timeout_s, worker)
                break
            if done + running >= n_trials:  # the last trials run elsewhere; one may still fail
                if not waiting:
                    log.info("worker %d waits: %d trials complete, %d running elsewhere", worker, done, running)
                waiting = True
                time.sleep(POLL_S)
                continue
            waiting = False
            study.optimize(objective, n_trials=1, gc_after_trial=False, callbacks=[count])
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
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **{f"param.{k}": v for k, v in t.params.items()},
                **{f"metric.{k}": v for k, v in t.user_attrs.get("metrics", {}).items()},
                "feasible": is_feasible(t),
                "warm_start": bool(t.user_attrs.get("warm_start")),
                "retry_of": t.system_attrs.get("retry_of", t.system_attrs.get("failed_trial")),
                "worker": "{host}:{pid}".format(**t.user_attrs["worker"]) if "worker" in t.user_attrs else None,
                "surplus": bool(t.user_attrs.get("surplus")),
            }
        )
    return pd.DataFrame(rows)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "params": dict(trial.params),
        "metrics": dict(trial.user_attrs.get("metrics", {})),
        "feasible": is_feasible(trial),
    }

"""The calibration run: pre-sample → search → select and validate → report → export, tracked in MLflow.

This module decides only the order of the stages (calibrate.stages, one module each), which process
runs them and how a run resumes; the stages read one frozen `RunContext` (calibrate.context).
Everything lands in the Hydra run folder (tables, plots, image grids, the Optuna journal study,
policy.yaml, timings.json) and, as artifacts, in one MLflow parent run with a child run per trial.
Pre-sampling, selection and export run once, in this process; the search runs here and, with
`search.workers=N`, in N-1 child processes too (calibrate.workers), all adding trials to one study.
A study has one such coordinating process: another that asks for the same study is refused in one
line naming it (calibrate.locks; `stages=[search]` joins as a search worker instead).

Crash safety: the study, its pre-sampling summary and the MLflow parent run's id live in the
Optuna storage, so running the same command again (same run folder, or the same storage URL and
study name) continues the calibration — finished trials and the pre-sampling are kept, a trial
cut short runs once more, selection and export run again — in the same MLflow parent run.
Exit status: 0 a validated policy was exported (or no export was asked for), 2 a mistake in the
input (nothing run, no run folder left), 3 the exported policy is NOT validated, 130 interrupted.
timings.json says where the wall time went, stage by stage (calibrate.timing).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from calibrate.config import CalibrationConfig
from calibrate.context import Output, RunContext, RunPaths
from calibrate.inputs import check_inputs, load, objective
from calibrate.knobs import PolicyFactory, SearchSpace, paper_defaults
from calibrate.locks import claim_study
from calibrate.parent_run import open_parent
from calibrate.presample import PresampleSummary
from calibrate.record import RunRecord
from calibrate.search import hold_for_crash_test, open_study, prepare_study
from calibrate.stages import evaluate, export, presample, report, search, validate
from calibrate.timing import Clock, Timed
from calibrate.tracking import NullTracker, open_tracker
from calibrate.workers import (
    NoPool,
    WorkerPool,
    WorkerSpec,
    check_shared_storage,
    interrupt_on_signals,
    start_workers,
    use_device,
    worker_devices,
)

log = logging.getLogger("calibrate")

STUDY_STAGES = {"presample", "search", "select", "export"}
EXIT_NOT_VALIDATED = 3  # the exported policy did not hold on the held-out prompts
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Outcome:
    policy: Path | None  # the run folder's policy.yaml, when exported
    exit_status: int  # 0, or EXIT_NOT_VALIDATED


def run_calibration(cfg: CalibrationConfig, paths: RunPaths) -> Outcome:
    """One `python -m calibrate` process: check the input, claim the study (one coordinator per
    study: another is refused in one line), then `_run`."""
    device = use_device(cfg)
    policies = check_inputs(cfg, paths)
    coordinates = bool(set(cfg.stages) & STUDY_STAGES) and not cfg.joins_only  # joining workers need no claim
    with claim_study(cfg.study_name, cfg.storage.url, paths.run_dir) if coordinates else contextlib.nullcontext():
        return _run(cfg, paths, device, policies)


def _run(cfg: CalibrationConfig, paths: RunPaths, device: torch.device, policies: list) -> Outcome:
    """Load, open the study and the MLflow parent run, run the stages, close the parent run."""
    stages = set(cfg.stages)
    clock = Clock(device)
    cost = objective(cfg, device)
    record = RunRecord(clock)
    # Build first: a missing weight file or prompt file fails in a second, before any tracking.
    with record.stage("setup"):
        devices = worker_devices(device, cfg.search.workers) if "search" in stages else [device]
        check_shared_storage(cfg.storage.url, len(devices))
        backend, prompts, clip = load(cfg, device, clock)
        study = None
        if stages & STUDY_STAGES:
            study = open_study(cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials)
            log.info("run folder %s; to continue it after a crash or Ctrl-C: %s", paths.run_dir, paths.resume_command())
            if cfg.joins_only:
                try:
                    presample.wait_for_summary(study)
                except KeyboardInterrupt:
                    raise SystemExit(EXIT_INTERRUPTED) from None
    with clock.section("tracking"):
        tracker = Timed(open_tracker(cfg.tracking, paths.run_dir, paths.launch_dir), clock, "tracking")
        parent, owned = open_parent(cfg, tracker, study, paths.run_dir, cfg.joins_only)
    ctx = RunContext(cfg, paths, device, cost, clock, backend, prompts, clip, study, tracker, parent)
    status = "FAILED"
    try:
        with (
            interrupt_on_signals(),
            start_workers(
                cfg,
                devices,
                paths.run_dir,
                paths.launch_dir,
                list(paths.overrides),
                tracker.address(),
                run_search_worker,
            ) as pool,
        ):
            outcome = _run_stages(ctx, record, pool, policies)
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        log.warning("interrupted; finished trials are kept in the study. To continue: %s", paths.resume_command())
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if study is not None and tracker.parent_id:  # trials of workers that died or were interrupted
            running = (optuna.trial.TrialState.RUNNING,)
            tracker.close_children(
                tracker.parent_id, lambda: {t.number for t in study.get_trials(deepcopy=False, states=running)}
            )
        if owned:
            record.close(ctx, status)


def _run_stages(ctx: RunContext, record: RunRecord, pool: WorkerPool | NoPool, policies: list) -> Outcome:
    stages = set(ctx.cfg.stages)
    if "evaluate" in stages:
        with record.stage("evaluate"):
            record.add("evaluate", evaluate.run(ctx, policies))
        if ctx.study is None:
            return Outcome(None, 0)
    summary, space = _presampled(ctx, record, pool)
    factory = PolicyFactory(summary, ctx.backend.name)
    if not ({"search", "select", "export"} & stages):
        return Outcome(None, 0)
    search_scorer = search.scorer(ctx, factory)
    if "search" in stages:
        with record.stage("search"):
            search.run(ctx, space, search_scorer)
            pool.finish()  # the other workers end with the study complete; select only after them
    if not ({"select", "export"} & stages):
        with record.stage("report"):
            record.add("search", report.search_tables(ctx))
        return Outcome(None, 0)
    with record.stage("validate"):
        validated = validate.run(ctx, factory)
    with record.stage("report"):
        for folder, output in report.run(ctx, validated, factory, search_scorer).items():
            record.add(folder, output)
    if "export" not in stages:
        return Outcome(None, 0)
    with record.stage("export"):
        path = export.run(ctx, validated.selection, factory, space, summary)
    record.add("policy", Output([path]))
    return Outcome(path, 0 if validated.selection.passed else EXIT_NOT_VALIDATED)


def _presampled(ctx: RunContext, record: RunRecord, pool: WorkerPool | NoPool) -> tuple[PresampleSummary, SearchSpace]:
    """The study's pre-sampling summary (pre-sampled here unless the study has one: a resumed study
    keeps its own) and the search space it gives; the study prepared, the workers let go."""
    cfg, study = ctx.cfg, ctx.study
    stored, fresh = presample.stored_summary(study), None
    if "presample" in cfg.stages and stored is not None:
        log.info("pre-sampling: study %r has its summary already; not run again", study.study_name)
        record.add("presample", Output(sorted((ctx.run_dir / "presample").glob("*"))))
    elif "presample" in cfg.stages:
        with record.stage("presample"):
            hold_for_crash_test("presample")
            fresh, output = presample.run(ctx)
            record.add("presample", output)
    if stored is None and fresh is None:
        raise presample.missing_summary(study)
    summary = stored if stored is not None else fresh
    space = SearchSpace.from_config(cfg.search.space, summary)
    if "search" in cfg.stages and not cfg.joins_only:  # before the summary goes in: joining workers wait for it
        warm_start = paper_defaults() if cfg.search.warm_start else None
        prepare_study(study, space, warm_start=warm_start, grace_s=cfg.storage.grace_period_s)
    summary = presample.shared_summary(study, summary)
    pool.go()
    if stored is None:  # a resumed parent run has it already
        ctx.tracker.log.params(ctx.parent, {"presample": summary.to_json()})
    return summary, space


def run_search_worker(spec: WorkerSpec, released: Any, orphaned: Any) -> None:
    """Child worker `spec.index` of a calibration (calibrate.workers spawns it): trials only. Loads its
    model and opens the study while the coordinator pre-samples; starts trials when `released()`."""
    cfg = spec.cfg
    device = use_device(cfg)
    clock = Clock(device)
    cost = objective(cfg, device)
    backend, prompts, clip = load(cfg, device, clock)
    study = open_study(
        cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials, worker=spec.index
    )
    tracker = spec.tracking.open() if spec.tracking is not None else NullTracker()
    paths = RunPaths(spec.run_dir, spec.launch_dir, tuple(spec.overrides))
    ctx = RunContext(cfg, paths, device, cost, clock, backend, prompts, clip, study, tracker, tracker.parent_id)
    if not released():
        return
    summary = presample.stored_summary(study)  # policies need the study's summary
    space = SearchSpace.from_config(cfg.search.space, summary)
    scorer = search.scorer(ctx, PolicyFactory(summary, backend.name))
    search.run(ctx, space, scorer, worker=spec.index, progress=False, should_stop=orphaned)

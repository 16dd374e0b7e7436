"""The calibration run: pre-sample → search → select and validate → export, tracked in MLflow.

Everything lands in the Hydra run folder (tables, plots, image grids, the Optuna journal study,
policy.yaml, timings.json) and, as artifacts, in one MLflow parent run with a child run per trial. Pre-sampling,
selection and export run once, in this process; the search runs here and, with
`search.workers=N`, in N-1 child processes too (calibrate.workers), all adding trials to one study.

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
import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch

from calibrate import plots
from calibrate.acceptance import SequentialTest, sequential_test
from calibrate.backend import CalibrationBackend, load_backend, weights_fingerprint
from calibrate.config import CalibrationConfig
from calibrate.export import (
    check_loads,
    copy_to,
    git_commit,
    portable_path,
    prompts_record,
    redact_url,
    versions,
    write_policy,
)
from calibrate.knobs import PolicyFactory, SearchSpace, paper_defaults
from calibrate.objective import PolicyScorer, resolve_cost
from calibrate.presample import PresampleSummary, run_presample, write_tables
from calibrate.prompts import PromptSets, load_prompt_sets
from calibrate.quality import ClipScorer, check_clip_folder, geneval_scorer
from calibrate.search import (
    POLL_S,
    completed,
    hold_for_crash_test,
    open_study,
    pareto_front,
    prepare_study,
    run_search,
    trial_summary,
    trials_frame,
)
from calibrate.select import Selection, select_and_validate
from calibrate.timing import Clock, Timed
from calibrate.tracking import NullTracker, Tracker, TrackerAddress, open_tracker
from calibrate.workers import (
    NoPool,
    WorkerPool,
    WorkerSpec,
    cap_torch_threads,
    cpu_threads,
    interrupt_on_signals,
    start_workers,
    worker_devices,
)
from toprovar.errors import UserError
from toprovar.models.registry import resolve_device, resolve_dtype

log = logging.getLogger("calibrate")

STUDY_PRESAMPLE_KEY = "presample_summary"
STUDY_MLFLOW_KEY = "mlflow_parent"  # {"tracking_uri", "run_id"}: the calibration's parent run
STUDY_STAGES = {"presample", "search", "select", "export"}
EXIT_NOT_VALIDATED = 3  # the exported policy did not hold on the held-out prompts
EXIT_INTERRUPTED = 130
# Held-out prompts shown in the validation grid: the first ones the validation used (all search
# prompts are shown in the search grid).
GRID_HELD_OUT = 16


def _quiet_libraries() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _parent_params(cfg: CalibrationConfig) -> dict[str, Any]:
    prompts = {k: v for k, v in asdict(cfg.prompts).items() if k != "items"}
    return {
        "backbone": cfg.backbone,
        "prompts": prompts,
        "search": asdict(cfg.search),
        "storage.url": redact_url(cfg.storage.url),
        "study_name": cfg.study_name,
        "seed": cfg.seed,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "stages": ",".join(cfg.stages),
    }


class Calibration:
    """One `python -m calibrate` run; each stage is a method so workers can run a subset."""

    def __init__(self, cfg: CalibrationConfig, run_dir: Path, launch_dir: Path, overrides: list[str]):
        self.cfg, self.run_dir, self.launch_dir, self.overrides = cfg, run_dir, launch_dir, overrides
        self.device = resolve_device(cfg.device)
        self.cost = resolve_cost(cfg.search.objective, self.device)
        if self.cost == "latency" and self.device.type != "cuda":
            log.warning(
                "search.objective=latency on %s: wall-clock timings are noisy; flops is the CPU default", self.device
            )
        self.clock = Clock(self.device)
        self.timings: dict[str, dict] = {}  # stage -> calibrate.timing record
        self.artifacts: dict[str, list[Path]] = {}
        self.exit_status = 0  # EXIT_NOT_VALIDATED once a policy that did not validate is exported
        self.clip: ClipScorer | None = None
        self.policies: list[tuple[str, Any]] = []  # the evaluate stage's (name, Policy), checked in run()
        self.pictures: dict[str, tuple[Path, int]] = {}  # MLflow image key -> (file, step)

    # -- stages -----------------------------------------------------------------------------------
    def presample(self, backend: CalibrationBackend, prompts: PromptSets) -> PresampleSummary:
        result = run_presample(backend, prompts.presample, self.cfg.search.constraints.min_ssim)
        folder = self.run_dir / "presample"
        files = write_tables(result, folder)
        with self.clock.section("pictures"):
            files.append(
                plots.plot_entropy_and_rho(
                    result.scales,
                    result.images,
                    result.summary.tau_range,
                    self.cfg.search.constraints.min_ssim,
                    folder / "fig8_entropy_rho.png",
                )
            )
            if len(result.layers):
                files.append(
                    plots.plot_layer_heatmap(
                        result.layers, result.summary.representative_scale, folder / "layer_ratio_heatmap.png"
                    )
                )
            exit_ssim = result.images.pivot(index="prompt", columns="scale", values="exit_ssim").to_numpy()
            files.append(
                plots.plot_early_exits(
                    result.exit_images,
                    result.full_images,
                    list(zip(result.scales.h, result.scales.w)),
                    exit_ssim,
                    prompts.presample.texts,
                    folder / "early_exits.png",
                ).path
            )
        self.artifacts["presample"] = files
        self.pictures.update({"early_exits": (files[-1], 0), "fig8_entropy_rho": (folder / "fig8_entropy_rho.png", 0)})
        log.info(
            "pre-sampling: ρ_s crossing %s, τ range %s, representative scale %d, %d band points",
            result.summary.crossing,
            result.summary.tau_range,
            result.summary.representative_scale,
            result.summary.band_points,
        )
        return result.summary

    def shared_summary(self, study: optuna.Study, fresh: PresampleSummary | None) -> PresampleSummary:
        """The study's pre-sampling facts: the first worker's win, so every trial sees the same space."""
        stored = study.user_attrs.get(STUDY_PRESAMPLE_KEY)
        if stored is not None:
            kept = PresampleSummary.from_json(stored)  # JSON holds lists where the summary has tuples
            if fresh is not None and fresh != kept:
                log.info("study %r keeps the pre-sampling summary it started with", study.study_name)
            return kept
        if fresh is None:
            raise UserError(
                f"study {study.study_name!r} has no pre-sampling summary yet; "
                f"run with the presample stage first (stages=[presample,search])"
            )
        study.set_user_attr(STUDY_PRESAMPLE_KEY, fresh.to_json())
        return fresh

    def search(
        self,
        study: optuna.Study,
        scorer: PolicyScorer,
        space: SearchSpace,
        tracker,
        *,
        worker: int = 0,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """This process's share of the search (worker `worker`); the study counts every worker's trials."""
        cfg = self.cfg.search
        threads = cpu_threads(self.device, cfg.workers)
        before = torch.get_num_threads()
        if threads is not None:  # N workers share the cores
            torch.set_num_threads(threads)
        try:
            return run_search(
                study,
                space,
                scorer,
                n_trials=cfg.n_trials,
                limits=cfg.constraints,
                tracker=tracker,
                timeout_s=cfg.timeout_s,
                grace_s=self.cfg.storage.grace_period_s,
                worker=worker,
                progress=progress,
                should_stop=should_stop,
            )
        finally:
            torch.set_num_threads(before)

    def search_worker(
        self, index: int, tracking: TrackerAddress | None, released: Callable[[], bool], orphaned: Callable[[], bool]
    ) -> int:
        """Worker `index` of a calibration started by calibrate.workers: trials only. Loads its
        model, opens the study and measures the unpruned reference while the coordinator
        pre-samples; starts trials when `released()`."""
        self._use_device()
        cfg = self.cfg
        backend = load_backend(
            cfg.backbone, self.device, resolve_dtype(cfg.dtype), batch_size=cfg.batch_size, clock=self.clock
        )
        prompts = load_prompt_sets(cfg.prompts)
        if cfg.quality.clip is not None:
            self.clip = ClipScorer(cfg.quality.clip, self.device)
        study = open_study(cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials, worker=index)
        tracker = tracking.open() if tracking is not None else NullTracker()
        scorer = self._search_scorer(backend, prompts, None)  # the unpruned reference, while pre-sampling runs
        if not released():
            return 0
        summary = PresampleSummary.from_json(study.user_attrs[STUDY_PRESAMPLE_KEY])
        scorer.build_policy = PolicyFactory(summary, backend.name)  # policies need the study's summary
        return self.search(
            study,
            scorer,
            SearchSpace.from_config(cfg.search.space, summary),
            tracker,
            worker=index,
            progress=False,
            should_stop=orphaned,
        )

    def _search_scorer(
        self, backend: CalibrationBackend, prompts: PromptSets, factory: PolicyFactory | None
    ) -> PolicyScorer:
        return self._scorer(backend, prompts.search, factory, geneval_scorer(backend.name), "search")

    def report_search(self, study: optuna.Study, selection: Selection | None = None) -> list[Path]:
        folder = self.run_dir / "search"
        folder.mkdir(parents=True, exist_ok=True)
        frame = trials_frame(study)
        # Which constraints each trial missed (Optuna's values: > 0 is a violation), for the plot.
        missed = {
            t.number: ",".join(k for k, v in (t.constraints or {}).items() if v > 0)
            for t in study.get_trials(deepcopy=False)
        }
        if len(frame):
            frame["violated"] = frame.number.map(missed).fillna("")
        frame.to_csv(folder / "trials.csv", index=False)
        frame.to_parquet(folder / "trials.parquet", index=False)
        front = pareto_front(study)
        (folder / "pareto_front.json").write_text(json.dumps([trial_summary(t) for t in front], indent=2))
        files = [folder / "trials.csv", folder / "trials.parquet", folder / "pareto_front.json"]
        validated = (
            []
            if selection is None
            else [
                {"number": number, "speedup": v.scores.speedup, "ssim": v.scores.ssim, "decision": v.verdict.decision}
                for number, v in selection.tried
            ]
        )
        with self.clock.section("pictures"):
            plot = plots.plot_pareto(
                frame,
                [t.number for t in front],
                self.cfg.search.constraints.min_ssim,
                folder / "pareto.png",
                None if selection is None else selection.trial.number,
                validated,
            )
        files.append(plot.path)
        self.pictures["pareto"] = (plot.path, len(completed(study)))
        return files

    def export(
        self,
        selection: Selection,
        factory: PolicyFactory,
        backend: CalibrationBackend,
        prompts: PromptSets,
        study: optuna.Study,
        space: SearchSpace,
        summary: PresampleSummary,
        search_scorer: PolicyScorer,
        tracker,
    ) -> Path:
        cfg = self.cfg
        trial = selection.trial
        provenance = {
            "calibrated": True,
            "validated": selection.passed,
            "backbone": {
                "name": backend.name,
                "weights": {k: portable_path(v) for k, v in backend.weights.items()},
                "weight_hashes": backend.fingerprint(),
                "settings": backend.settings,
            },
            "prompts": {"source": cfg.prompts.source, **prompts_record(asdict_sets(prompts))},
            "search": {
                "space": space.as_dict(),
                "sampler": cfg.search.sampler,
                "objective": self.cost,
                "constraints": asdict(cfg.search.constraints),
                "trials_complete": len(completed(study)),
                "trials_total": len(study.trials),
                "study_name": study.study_name,
                "storage": redact_url(cfg.storage.url),
                "selected_trial": trial.number,
            },
            # The CLIP model behind the CLIPScore bounds (quality.clip), by hash as the weights are.
            "quality": {
                "clip": None
                if cfg.quality.clip is None
                else {"folder": portable_path(cfg.quality.clip), "hash": weights_fingerprint(cfg.quality.clip)}
            },
            "measured": {
                "search": dict(trial.user_attrs.get("metrics", {})),
                "validation": selection.validation.scores.metrics(),
                "validation_candidates": [
                    {"trial": n, **v.scores.metrics(), "acceptance": v.verdict.record()} for n, v in selection.tried
                ],
            },
            # The promise: bounds, confidence, margins, prompts used, lost/won and the decision.
            "acceptance": selection.validation.verdict.record(),
            "presample": summary.to_json(),
            "device": str(self.device),
            "versions": versions(),
            "git_commit": git_commit(self.launch_dir),
            "command": "python -m calibrate " + " ".join(self.overrides),
            "mlflow": {
                "tracking_uri": redact_url(getattr(tracker, "uri", None)),
                "parent_run_id": getattr(tracker, "parent_id", None),
            },
        }
        path = write_policy(factory.document(trial.params), provenance, self.run_dir / "policy.yaml")
        check_loads(path, backend.name)
        verdict = selection.validation.verdict
        log.info(
            "policy written to %s (trial %d: held-out speedup %.2f×, SSIM %.3f; %s at %d%% confidence after "
            "%d prompts%s)",
            path,
            trial.number,
            selection.validation.scores.speedup,
            selection.validation.scores.ssim,
            verdict.decision,
            round(100 * verdict.confidence),
            verdict.prompts,
            "" if selection.passed else ", NOT validated",
        )
        if cfg.export_to:
            copied = copy_to(
                path,
                Path(cfg.export_to) if Path(cfg.export_to).is_absolute() else self.launch_dir / cfg.export_to,
                backend.name,
            )
            log.info("policy copied to %s", copied)
        return path

    # -- the whole run -----------------------------------------------------------------------------
    @property
    def joins_only(self) -> bool:
        """`stages=[search]`: a worker joining a calibration another process pre-samples and ends."""
        return set(self.cfg.stages) == {"search"}

    def resume_command(self) -> str:
        """The command that continues this run: the same overrides, the same run folder."""
        args = [a for a in self.overrides if not a.startswith("hydra.run.dir=")]
        return shlex.join(["python", "-m", "calibrate", *args, f"hydra.run.dir={self.run_dir}"])

    def _use_device(self) -> None:
        """Make the configured GPU the current one: CUDA events (latency) and Triton kernels act on
        the current device, which is cuda:0 unless set — wrong for worker i on cuda:i. Caps torch's
        threads at the CPUs this process may use (a CPU quota is not what torch counts)."""
        _quiet_libraries()
        cap_torch_threads()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    def run(self) -> Path | None:
        self._use_device()
        cfg, stages = self.cfg, set(self.cfg.stages)
        if cfg.quality.clip is not None:  # a wrong folder is a one-line error before any model loads
            check_clip_folder(cfg.quality.clip)
        if "evaluate" in stages:  # the policies too: their schema and their fit to the backbone, no weights
            self.policies = self.check_policies()
        start = self.clock.snapshot()
        # Build first: a missing weight file or prompt file fails in a second, before any tracking.
        with self._stage("setup"):
            devices = worker_devices(self.device, cfg.search.workers) if "search" in stages else [self.device]
            self._check_storage(len(devices))
            backend = load_backend(
                cfg.backbone, self.device, resolve_dtype(cfg.dtype), batch_size=cfg.batch_size, clock=self.clock
            )
            prompts = load_prompt_sets(cfg.prompts)
            if cfg.quality.clip is not None:
                self.clip = ClipScorer(cfg.quality.clip, self.device)
            study = None
            if stages & STUDY_STAGES:
                study = open_study(cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials)
                log.info(
                    "run folder %s; to continue it after a crash or Ctrl-C: %s", self.run_dir, self.resume_command()
                )
                if self.joins_only:
                    try:
                        self._wait_for_summary(study)
                    except KeyboardInterrupt:
                        raise SystemExit(EXIT_INTERRUPTED) from None
        with self.clock.section("tracking"):
            tracker = Timed(open_tracker(cfg.tracking, self.run_dir, self.launch_dir), self.clock, "tracking")
            parent, owned = self._open_parent(tracker, study)
        status = "FAILED"
        try:
            with (
                interrupt_on_signals(),
                start_workers(
                    cfg, devices, self.run_dir, self.launch_dir, self.overrides, tracker.address(), run_search_worker
                ) as pool,
            ):
                policy_path = self._stages(backend, prompts, study, tracker, parent, pool)
            status = "FINISHED"
            return policy_path
        except KeyboardInterrupt:
            status = "KILLED"
            log.warning("interrupted; finished trials are kept in the study. To continue: %s", self.resume_command())
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            if study is not None and tracker.parent_id:  # trials of workers that died or were interrupted
                tracker.close_children(
                    tracker.parent_id,
                    lambda: {
                        t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                    },
                )
            if owned:
                with self._stage("tracking"):
                    self._log_files(tracker, parent)
                self.timings["total"] = self.clock.record(start)
                path = self.write_timings(backend)
                tracker.log_artifacts(parent, [path])
                tracker.log_metrics(
                    parent,
                    {
                        f"time.{stage}.{k}": v
                        for stage, record in self.timings.items()
                        for k, v in record.items()
                        if isinstance(v, (int, float))
                    },
                )
                tracker.end(parent, status=status)

    def _check_storage(self, workers: int) -> None:
        url = self.cfg.storage.url
        if workers > 1 and url is None:
            raise UserError(
                f"search.workers={workers} share the study through its storage, but storage=memory "
                f"keeps it inside one process; use the default storage=journal (or a database URL)"
            )
        if workers > 1 and url.startswith("sqlite"):
            log.warning(
                "SQLite with %d workers: concurrent writers can fail with 'database is locked'; "
                "the default storage=journal (one host) or PostgreSQL are safe",
                workers,
            )

    def _wait_for_summary(self, study: optuna.Study) -> None:
        """A joining worker waits until the calibration's pre-sampling has put its summary in the study."""
        waited = 0.0
        while STUDY_PRESAMPLE_KEY not in study.user_attrs:
            if waited % 60 == 0:
                log.info(
                    "waiting for study %r to get its pre-sampling summary (from the calibration that runs "
                    "the presample stage with the same storage.url and study_name)",
                    study.study_name,
                )
            time.sleep(POLL_S)
            waited += POLL_S

    def _open_parent(self, tracker: Tracker | NullTracker, study: optuna.Study | None) -> tuple[str, bool]:
        """The calibration's MLflow parent run and whether this process ends it: the one stored with
        the study when it is in this tracking store (continued; a joining worker only logs into it),
        else a new one, stored with the study."""
        cfg = self.cfg
        params = _parent_params(cfg)
        stored = study.user_attrs.get(STUDY_MLFLOW_KEY) if study is not None else None
        if stored is not None and stored.get("tracking_uri") == redact_url(tracker.uri) and tracker.uri:
            if self.joins_only:
                tracker.attach(stored["run_id"])
                return stored["run_id"], False
            if tracker.resume_parent(stored["run_id"], params):
                return stored["run_id"], True
        parent = tracker.start_parent(
            f"{cfg.backbone_name}/{cfg.study_name}",
            params,
            tags={"backbone": cfg.backbone_name, "run_dir": str(self.run_dir)},
        )
        if study is not None and tracker.parent_id and not self.joins_only:
            study.set_user_attr(STUDY_MLFLOW_KEY, {"tracking_uri": redact_url(tracker.uri), "run_id": parent})
        return parent, True

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Time a stage (calibrate.timing): its record goes to `self.timings[name]`."""
        self.clock.reset_peak_memory()
        start = self.clock.snapshot()
        try:
            yield
        finally:
            record = {**self.clock.record(start), **self.clock.peak_memory_gib()}
            self.timings[name] = record
            log.info(
                "%s took %.1f s (%.0f%% generating, %d images, %s images/s while generating)",
                name,
                record["wall_s"],
                100 * (record["generation_share"] or 0),
                record["images"],
                record["images_per_s_generating"],
            )

    def write_timings(self, backend: CalibrationBackend) -> Path:
        """timings.json: each stage's record, the run's total, the device and the batch size."""
        total = self.timings.get("total", {})
        peaks = [r.get("peak_allocated_gib") for r in self.timings.values() if r.get("peak_allocated_gib") is not None]
        document = {
            "backbone": backend.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "batch_size": backend.batch_size,
            "settings": backend.settings,
            "objective": self.cost,
            "trials": self.cfg.search.n_trials,
            "prompts": {k: getattr(self.cfg.prompts, k) for k in ("presample", "search", "validate")},
            "peak_allocated_gib": max(peaks) if peaks else None,
            "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0) for r in self.timings.values())
            if peaks
            else None,
            "generation_share": total.get("generation_share"),
            # the same without loading the weights (setup), which a running service pays once
            "generation_share_after_setup": _share_after_setup(self.timings),
            "stages": self.timings,
        }
        path = self.run_dir / "timings.json"
        path.write_text(json.dumps(document, indent=2, default=str))
        return path

    def _stages(
        self,
        backend: CalibrationBackend,
        prompts: PromptSets,
        study: optuna.Study | None,
        tracker: Tracker | NullTracker,
        parent: str,
        pool: WorkerPool | NoPool,
    ) -> Path | None:
        cfg, stages = self.cfg, set(self.cfg.stages)
        if "evaluate" in stages:
            with self._stage("evaluate"):
                self.artifacts["evaluate"] = self.evaluate(backend, prompts, tracker, parent)
            if study is None:
                return None
        stored = study.user_attrs.get(STUDY_PRESAMPLE_KEY)
        fresh = None
        if "presample" in stages and stored is not None:  # a resumed study: its summary decides, keep it
            log.info("pre-sampling: study %r has its summary already; not run again", study.study_name)
            self.artifacts["presample"] = sorted((self.run_dir / "presample").glob("*"))
        elif "presample" in stages:
            with self._stage("presample"):
                hold_for_crash_test("presample")
                fresh = self.presample(backend, prompts)
        if stored is None and fresh is None:
            raise UserError(
                f"study {study.study_name!r} has no pre-sampling summary yet; "
                f"run with the presample stage first (stages=[presample,search])"
            )
        summary = PresampleSummary.from_json(stored) if stored is not None else fresh
        space = SearchSpace.from_config(cfg.search.space, summary)
        if "search" in stages and not self.joins_only:  # before the summary goes in: joining workers wait for it
            prepare_study(
                study,
                space,
                warm_start=paper_defaults() if cfg.search.warm_start else None,
                grace_s=cfg.storage.grace_period_s,
            )
        summary = self.shared_summary(study, summary)
        pool.go()
        if stored is None:  # a resumed parent run has it already
            tracker.log_params(parent, {"presample": summary.to_json()})
        factory = PolicyFactory(summary, backend.name)

        if not ({"search", "select", "export"} & stages):
            return None
        scorer = self._search_scorer(backend, prompts, factory)
        if "search" in stages:
            with self._stage("search"):
                self.search(study, scorer, space, tracker)
                pool.finish()  # the other workers end with the study complete; select only after them
        if not ({"select", "export"} & stages):
            with self._stage("report"):
                self.artifacts["search"] = self.report_search(study)
            return None

        with self._stage("validate"):
            hold_for_crash_test("validate")
            evaluator = geneval_scorer(backend.name)
            validator = self._scorer(backend, prompts.validate, factory, evaluator, "validate")
            test = sequential_test(
                cfg.search.acceptance, len(prompts.validate), evaluator is not None, clip=self.clip is not None
            )
            selection = select_and_validate(
                study,
                lambda params: validator.validate(factory(params), test, "validate"),
                cfg.search.validate_candidates,
            )
        with self._stage("report"):
            self.artifacts["search"] = self.report_search(study, selection)
            self.artifacts["grids"] = self._grids(selection, factory, scorer, validator)
            self.artifacts["validation"] = [self._write_paired(selection, validator)]
            verdict = selection.validation.verdict
            tracker.log_metrics(
                parent, {f"validation.{k}": v for k, v in selection.validation.scores.metrics().items()}
            )
            tracker.log_metrics(parent, {f"acceptance.{k}": v for k, v in verdict.metrics().items()})
            tracker.log_metrics(
                parent, {f"search.{k}": v for k, v in selection.trial.user_attrs.get("metrics", {}).items()}
            )
            tracker.set_tags(
                parent,
                {
                    "selected_trial": selection.trial.number,
                    "validated": selection.passed,
                    "acceptance": verdict.decision,
                },
            )
        if "export" not in stages:
            return None
        with self._stage("export"):
            path = self.export(selection, factory, backend, prompts, study, space, summary, scorer, tracker)
        self.artifacts["policy"] = [path]
        if not selection.passed:
            self.exit_status = EXIT_NOT_VALIDATED
        hold_for_crash_test("export")
        return path

    def _scorer(self, backend: CalibrationBackend, prompt_set, build_policy, evaluator, desc: str) -> PolicyScorer:
        cfg = self.cfg.search
        return PolicyScorer(
            backend,
            prompt_set,
            build_policy,
            cost=self.cost,
            latency=cfg.latency,
            evaluator=evaluator,
            geneval_score=cfg.acceptance.score,
            desc=desc,
            clip=self.clip,
        )

    def check_policies(self) -> list[tuple[str, Any]]:
        """`(name, Policy)` of each `evaluate` entry, checked against the schema and the backbone's
        schedule and depth (`toprovar.policy.load_policy` with its spec): one-line errors, no weights."""
        from toprovar.cli import generation_settings
        from toprovar.models.registry import get_backbone
        from toprovar.policy import load_policy

        backbone = self.cfg.backbone
        spec, settings = get_backbone(str(backbone["name"])), generation_settings(backbone)
        return [
            (name, load_policy(name, spec, pixels=settings.get("pixels"), h_div_w=settings.get("h_div_w")))
            for name in self.cfg.evaluate
        ]

    def evaluate(self, backend: CalibrationBackend, prompts: PromptSets, tracker, parent: str) -> list[Path]:
        """Measure existing policies on every held-out prompt with the validation code; a table with
        each policy's one-sided bounds and decision at `search.acceptance` (one look: all prompts)."""
        import dataclasses

        import pandas as pd
        from tqdm.auto import tqdm

        policies = self.policies  # checked by `run` before any weights loaded
        evaluator = geneval_scorer(backend.name)
        acceptance = self.cfg.search.acceptance
        scorer = self._scorer(backend, prompts.validate, lambda params: params, evaluator, "evaluate")
        test: SequentialTest = sequential_test(
            acceptance, len(prompts.validate), evaluator is not None, clip=self.clip is not None
        )
        test = dataclasses.replace(test, batch=test.budget)  # a measurement: every prompt, one look
        rows, images = [], [("unpruned", scorer.reference().images)]
        for name, policy in tqdm(policies, desc="evaluate", unit="policy", dynamic_ncols=True):
            result = scorer.validate(policy, test)
            metrics = {**result.scores.metrics(), **{f"acceptance.{k}": v for k, v in result.verdict.metrics().items()}}
            rows.append({"policy": name, **metrics, "decision": result.verdict.decision})
            images.append((str(name), result.scores.images))
            tracker.log_metrics(parent, {f"evaluate.{len(rows) - 1}.{k}": v for k, v in metrics.items()})
        frame = pd.DataFrame(rows)
        folder = self.run_dir / "evaluate"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / "policies.csv", index=False)
        shown = [
            c
            for c in (
                "policy",
                "speedup",
                "ssim",
                "acceptance.ssim.lower",
                "geneval_drop",
                "acceptance.geneval_drop.upper",
                "prompts_lost",
                "prompts_won",
                "decision",
                "kept_share",
                "D_mean",
            )
            if c in frame
        ]
        reference = scorer.reference()
        unpruned = f"{float(reference.scores[acceptance.score].mean()):.4f}" if reference.scores else "n/a"
        log.info(
            "%d policies on %d held-out prompts (unpruned geneval-lite %s %s; bounds one-sided at %g):\n%s",
            len(rows),
            len(prompts.validate),
            acceptance.score,
            unpruned,
            acceptance.confidence,
            frame[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        )
        with self.clock.section("pictures"):
            grid = plots.plot_policies_grid(images, prompts.validate.texts, folder / "unpruned_vs_policies.png").path
        self.pictures["evaluate_grid"] = (grid, 0)
        return [folder / "policies.csv", grid]

    def _grids(
        self, selection: Selection, factory: PolicyFactory, search: PolicyScorer, validator: PolicyScorer
    ) -> list[Path]:
        """Unpruned (top row) over the selected policy (bottom row), one column per prompt: every
        search prompt (generated again with the policy) and the first `GRID_HELD_OUT` held-out
        prompts the validation used (its own images); each policy image noted with its SSIM and
        score changes, framed red / green where its prompt was lost / won. Cells ≤ 256 px."""
        folder = self.run_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        number = selection.trial.number
        run, ref, paired = search.run_paired(factory(selection.trial.params), desc="grid: search prompts")
        # Lost / won by the score acceptance bounds: geneval-lite where the backbone has it, else CLIPScore.
        mark_key = next(
            (k for k in (f"geneval_drop.{self.cfg.search.acceptance.score}", "clip_drop") if k in paired), None
        )
        held_out = selection.validation
        shown = min(GRID_HELD_OUT, len(held_out.paired["ssim"]))
        files = []
        with self.clock.section("pictures"):
            for name, unpruned, pruned, values, prompts, title in (
                (
                    "search",
                    ref.images,
                    run.images,
                    paired,
                    search.prompts.texts,
                    f"Search prompts (all {len(run)}), trial {number}",
                ),
                (
                    "validate",
                    validator.reference(shown).images,
                    held_out.scores.images[:shown],
                    {k: v[:shown] for k, v in held_out.paired.items()},
                    validator.prompts.texts,
                    f"Held-out prompts: the first {shown} of the {len(held_out.paired['ssim'])} validation used "
                    f"({len(validator.prompts)} in the set), trial {number}, {held_out.verdict.decision}",
                ),
            ):
                layout = plots.plot_policy_grid(
                    unpruned,
                    pruned,
                    prompts,
                    values,
                    folder / f"{name}_unpruned_vs_policy.png",
                    title,
                    policy_label=f"policy (trial {number})",
                    mark_key=mark_key,
                )
                files.append(layout.path)
                self.pictures[f"grid_{name}"] = (layout.path, number)
        return files

    def _write_paired(self, selection: Selection, validator: PolicyScorer) -> Path:
        """validation/per_prompt.csv: every probe's per-prompt paired values (what its bounds rest on)."""
        import pandas as pd

        frames = [
            pd.DataFrame(
                {
                    "trial": number,
                    "decision": result.verdict.decision,
                    "prompt": range(len(result.paired["ssim"])),
                    "seed": validator.prompts.seeds[: len(result.paired["ssim"])],
                    **result.paired,
                }
            )
            for number, result in selection.tried
        ]
        path = self.run_dir / "validation" / "per_prompt.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_csv(path, index=False)
        return path

    def _log_files(self, tracker: Tracker | NullTracker, parent: str) -> None:
        """Every file as an artifact in its folder; the pictures also as MLflow images (with steps:
        the selected trial for the grids, the complete trials for the Pareto plot)."""
        for folder, files in self.artifacts.items():
            if folder == "grids" and not self.cfg.tracking.log_images:
                continue
            tracker.log_artifacts(parent, files, folder)
        if self.cfg.tracking.log_images:
            for key, (path, step) in self.pictures.items():
                if path.exists():
                    tracker.log_image(parent, path, key, step)


def _share_after_setup(timings: dict[str, dict]) -> float | None:
    stages = [r for name, r in timings.items() if name not in ("setup", "total")]
    wall = sum(r["wall_s"] for r in stages)
    return round(sum(r["generation_s"] for r in stages) / wall, 4) if wall > 0 else None


def run_search_worker(spec: WorkerSpec, released: Callable[[], bool], orphaned: Callable[[], bool]) -> None:
    """The body of child worker `spec.index` (calibrate.workers spawns it): trials only."""
    calibration = Calibration(spec.cfg, spec.run_dir, spec.launch_dir, spec.overrides)
    calibration.search_worker(spec.index, spec.tracking, released, orphaned)


@contextlib.contextmanager
def discard_unused_run_dir(run_dir: Path, launch_dir: Path) -> Iterator[None]:
    """On a UserError (a mistake in the input, found before any work), remove the run folder Hydra
    made when it holds nothing but Hydra's own files (.hydra/, the log), timings.json and empty files — and the
    folders above it up to outputs/ that are left empty — so a wrong argument leaves no folder."""
    try:
        yield
    except UserError:
        files = [f for f in run_dir.rglob("*") if f.is_file()] if run_dir.is_dir() else []
        if all(
            f.relative_to(run_dir).parts[0] == ".hydra"
            or f.suffix == ".log"
            or f.name == "timings.json"
            or f.stat().st_size == 0
            for f in files
        ):
            shutil.rmtree(run_dir, ignore_errors=True)
            outputs = (launch_dir / "outputs").resolve()
            parent = run_dir.resolve().parent
            while parent.is_relative_to(outputs) and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        raise


def asdict_sets(prompts: PromptSets) -> dict[str, Any]:
    return {"presample": prompts.presample, "search": prompts.search, "validate": prompts.validate}

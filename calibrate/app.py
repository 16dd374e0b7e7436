"""The calibration run: pre-sample → search → select and validate → export, tracked in MLflow.

Everything lands in the Hydra run folder (tables, plots, image grids, the Optuna SQLite study,
policy.yaml, timings.json) and, as artifacts, in one MLflow parent run with a child run per trial.
timings.json says where the wall time went, stage by stage (calibrate.timing).
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch

from calibrate import plots
from calibrate.acceptance import SequentialTest, sequential_test
from calibrate.backend import CalibrationBackend, load_backend, resolve_dtype, weights_fingerprint
from calibrate.config import CalibrationConfig
from calibrate.export import (check_loads, copy_to, git_commit, portable_path, prompts_record, redact_url, versions,
                              write_policy)
from calibrate.objective import PolicyScorer, resolve_cost
from calibrate.knobs import PolicyFactory, SearchSpace, paper_defaults
from calibrate.presample import PresampleSummary, run_presample, write_tables
from calibrate.prompts import PromptSets, load_prompt_sets
from calibrate.quality import ClipScorer, check_clip_folder, geneval_scorer
from calibrate.search import completed, open_study, pareto_front, run_search, trial_summary, trials_frame
from calibrate.select import Selection, select_and_validate
from calibrate.timing import Clock, Timed
from calibrate.tracking import NullTracker, Tracker, open_tracker
from toprovar.errors import UserError
from toprovar.models.registry import resolve_device

log = logging.getLogger("calibrate")

STUDY_PRESAMPLE_KEY = "presample_summary"
# Held-out prompts shown in the validation grid: the first ones the validation used (all search
# prompts are shown in the search grid).
GRID_HELD_OUT = 16


def _quiet_libraries() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _parent_params(cfg: CalibrationConfig) -> dict[str, Any]:
    prompts = {k: v for k, v in asdict(cfg.prompts).items() if k != "items"}
    return {"backbone": cfg.backbone, "prompts": prompts, "search": asdict(cfg.search),
            "storage.url": redact_url(cfg.storage.url), "study_name": cfg.study_name, "seed": cfg.seed,
            "device": cfg.device, "dtype": cfg.dtype, "stages": ",".join(cfg.stages)}


class Calibration:
    """One `python -m calibrate` run; each stage is a method so workers can run a subset."""

    def __init__(self, cfg: CalibrationConfig, run_dir: Path, launch_dir: Path, overrides: list[str]):
        self.cfg, self.run_dir, self.launch_dir, self.overrides = cfg, run_dir, launch_dir, overrides
        self.device = resolve_device(cfg.device)
        self.cost = resolve_cost(cfg.search.objective, self.device)
        if self.cost == "latency" and self.device.type != "cuda":
            log.warning("search.objective=latency on %s: wall-clock timings are noisy; flops is the CPU default",
                        self.device)
        self.clock = Clock(self.device)
        self.timings: dict[str, dict] = {}       # stage -> calibrate.timing record
        self.artifacts: dict[str, list[Path]] = {}
        self.clip: ClipScorer | None = None
        self.pictures: dict[str, tuple[Path, int]] = {}  # MLflow image key -> (file, step)

    # -- stages -----------------------------------------------------------------------------------
    def presample(self, backend: CalibrationBackend, prompts: PromptSets) -> PresampleSummary:
        result = run_presample(backend, prompts.presample, self.cfg.search.constraints.min_ssim)
        folder = self.run_dir / "presample"
        files = write_tables(result, folder)
        with self.clock.section("pictures"):
            files.append(plots.plot_entropy_and_rho(result.scales, result.images, result.summary.tau_range,
                                                    self.cfg.search.constraints.min_ssim,
                                                    folder / "fig8_entropy_rho.png"))
            if len(result.layers):
                files.append(plots.plot_layer_heatmap(result.layers, result.summary.representative_scale,
                                                      folder / "layer_ratio_heatmap.png"))
            exit_ssim = result.images.pivot(index="prompt", columns="scale", values="exit_ssim").to_numpy()
            files.append(plots.plot_early_exits(result.exit_images, result.full_images,
                                                list(zip(result.scales.h, result.scales.w)), exit_ssim,
                                                prompts.presample.texts, folder / "early_exits.png").path)
        self.artifacts["presample"] = files
        self.pictures.update({"early_exits": (files[-1], 0), "fig8_entropy_rho": (folder / "fig8_entropy_rho.png", 0)})
        log.info("pre-sampling: ρ_s crossing %s, τ range %s, representative scale %d, %d band points",
                 result.summary.crossing, result.summary.tau_range, result.summary.representative_scale,
                 result.summary.band_points)
        return result.summary

    def shared_summary(self, study: optuna.Study, fresh: PresampleSummary | None) -> PresampleSummary:
        """The study's pre-sampling facts: the first worker's win, so every trial sees the same space."""
        stored = study.user_attrs.get(STUDY_PRESAMPLE_KEY)
        if stored is not None:
            if fresh is not None and fresh.to_json() != stored:
                log.info("study %r keeps the pre-sampling summary it started with", study.study_name)
            return PresampleSummary.from_json(stored)
        if fresh is None:
            raise UserError(f"study {study.study_name!r} has no pre-sampling summary yet; "
                            f"run with the presample stage first (stages=[presample,search])")
        study.set_user_attr(STUDY_PRESAMPLE_KEY, fresh.to_json())
        return fresh

    def search(self, study: optuna.Study, scorer: PolicyScorer, space: SearchSpace, tracker) -> int:
        cfg = self.cfg.search
        ran = run_search(study, space, scorer, n_trials=cfg.n_trials, limits=cfg.constraints,
                         warm_start=paper_defaults() if cfg.warm_start else None, tracker=tracker,
                         timeout_s=cfg.timeout_s)
        return ran

    def report_search(self, study: optuna.Study, selection: Selection | None = None) -> list[Path]:
        folder = self.run_dir / "search"
        folder.mkdir(parents=True, exist_ok=True)
        frame = trials_frame(study)
        # Which constraints each trial missed (Optuna's values: > 0 is a violation), for the plot.
        missed = {t.number: ",".join(k for k, v in (t.constraints or {}).items() if v > 0)
                  for t in study.get_trials(deepcopy=False)}
        if len(frame):
            frame["violated"] = frame.number.map(missed).fillna("")
        frame.to_csv(folder / "trials.csv", index=False)
        frame.to_parquet(folder / "trials.parquet", index=False)
        front = pareto_front(study)
        (folder / "pareto_front.json").write_text(json.dumps([trial_summary(t) for t in front], indent=2))
        files = [folder / "trials.csv", folder / "trials.parquet", folder / "pareto_front.json"]
        validated = [] if selection is None else [
            {"number": number, "speedup": v.scores.speedup, "ssim": v.scores.ssim, "decision": v.verdict.decision}
            for number, v in selection.tried]
        with self.clock.section("pictures"):
            plot = plots.plot_pareto(frame, [t.number for t in front], self.cfg.search.constraints.min_ssim,
                                     folder / "pareto.png", None if selection is None else selection.trial.number,
                                     validated)
        files.append(plot.path)
        self.pictures["pareto"] = (plot.path, len(completed(study)))
        return files

    def export(self, selection: Selection, factory: PolicyFactory, backend: CalibrationBackend,
               prompts: PromptSets, study: optuna.Study, space: SearchSpace, summary: PresampleSummary,
               search_scorer: PolicyScorer, tracker) -> Path:
        cfg = self.cfg
        trial = selection.trial
        provenance = {
            "calibrated": True,
            "validated": selection.passed,
            "backbone": {"name": backend.name, "weights": {k: portable_path(v) for k, v in backend.weights.items()},
                         "weight_hashes": backend.fingerprint(), "settings": backend.settings},
            "prompts": {"source": cfg.prompts.source, **prompts_record(asdict_sets(prompts))},
            "search": {"space": space.as_dict(), "sampler": cfg.search.sampler, "objective": self.cost,
                       "constraints": asdict(cfg.search.constraints), "trials_complete": len(completed(study)),
                       "trials_total": len(study.trials), "study_name": study.study_name,
                       "storage": redact_url(cfg.storage.url), "selected_trial": trial.number},
            # The CLIP model behind the CLIPScore bounds (quality.clip), by hash as the weights are.
            "quality": {"clip": None if cfg.quality.clip is None else
                        {"folder": portable_path(cfg.quality.clip), "hash": weights_fingerprint(cfg.quality.clip)}},
            "measured": {"search": dict(trial.user_attrs.get("metrics", {})),
                         "validation": selection.validation.scores.metrics(),
                         "validation_candidates": [{"trial": n, **v.scores.metrics(), "acceptance": v.verdict.record()}
                                                   for n, v in selection.tried]},
            # The promise: bounds, confidence, margins, prompts used, lost/won and the decision.
            "acceptance": selection.validation.verdict.record(),
            "presample": summary.to_json(),
            "device": str(self.device),
            "versions": versions(),
            "git_commit": git_commit(self.launch_dir),
            "command": "python -m calibrate " + " ".join(self.overrides),
            "mlflow": {"tracking_uri": redact_url(getattr(tracker, "uri", None)),
                       "parent_run_id": getattr(tracker, "parent_id", None)},
        }
        path = write_policy(factory.document(trial.params), provenance, self.run_dir / "policy.yaml")
        check_loads(path, backend.name)
        verdict = selection.validation.verdict
        log.info("policy written to %s (trial %d: held-out speedup %.2f×, SSIM %.3f; %s at %d%% confidence after "
                 "%d prompts%s)", path, trial.number, selection.validation.scores.speedup,
                 selection.validation.scores.ssim, verdict.decision, round(100 * verdict.confidence), verdict.prompts,
                 "" if selection.passed else ", NOT validated")
        if cfg.export_to:
            copied = copy_to(path, Path(cfg.export_to) if Path(cfg.export_to).is_absolute()
                             else self.launch_dir / cfg.export_to, backend.name)
            log.info("policy copied to %s", copied)
        return path

    # -- the whole run -----------------------------------------------------------------------------
    def run(self) -> Path | None:
        _quiet_libraries()
        cfg = self.cfg
        if cfg.quality.clip is not None:  # a wrong folder is a one-line error before any model loads
            check_clip_folder(cfg.quality.clip)
        start = self.clock.snapshot()
        # Build first: a missing weight file or prompt file fails in a second, before any tracking.
        with self._stage("setup"):
            backend = load_backend(cfg.backbone, self.device, resolve_dtype(cfg.dtype, self.device),
                                   batch_size=cfg.batch_size, clock=self.clock)
            prompts = load_prompt_sets(cfg.prompts)
            study = open_study(cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials)
            if cfg.quality.clip is not None:
                self.clip = ClipScorer(cfg.quality.clip, self.device)
        with self.clock.section("tracking"):
            tracker = Timed(open_tracker(cfg.tracking, self.run_dir, self.launch_dir), self.clock, "tracking")
            parent = tracker.start_parent(f"{cfg.backbone_name}/{cfg.study_name}", _parent_params(cfg),
                                          tags={"backbone": cfg.backbone_name, "run_dir": str(self.run_dir)})
        ok = False
        try:
            policy_path = self._stages(backend, prompts, study, tracker, parent)
            ok = True
            return policy_path
        finally:
            with self._stage("tracking"):
                self._log_files(tracker, parent)
            self.timings["total"] = self.clock.record(start)
            path = self.write_timings(backend)
            tracker.log_artifacts(parent, [path])
            tracker.log_metrics(parent, {f"time.{stage}.{k}": v for stage, record in self.timings.items()
                                         for k, v in record.items() if isinstance(v, (int, float))})
            tracker.end(parent, ok=ok)

    @contextmanager
    def _stage(self, name: str):
        """Time a stage (calibrate.timing): its record goes to `self.timings[name]`."""
        self.clock.reset_peak_memory()
        start = self.clock.snapshot()
        try:
            yield
        finally:
            record = {**self.clock.record(start), **self.clock.peak_memory_gib()}
            self.timings[name] = record
            log.info("%s took %.1f s (%.0f%% generating, %d images, %s images/s while generating)", name,
                     record["wall_s"], 100 * (record["generation_share"] or 0), record["images"],
                     record["images_per_s_generating"])

    def write_timings(self, backend: CalibrationBackend) -> Path:
        """timings.json: each stage's record, the run's total, the device and the batch size."""
        total = self.timings.get("total", {})
        peaks = [r.get("peak_allocated_gib") for r in self.timings.values() if r.get("peak_allocated_gib") is not None]
        document = {"backbone": backend.name, "device": str(self.device),
                    "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                    "batch_size": backend.batch_size, "settings": backend.settings, "objective": self.cost,
                    "trials": self.cfg.search.n_trials, "prompts": {k: getattr(self.cfg.prompts, k)
                                                                   for k in ("presample", "search", "validate")},
                    "peak_allocated_gib": max(peaks) if peaks else None,
                    "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0) for r in self.timings.values())
                    if peaks else None,
                    "generation_share": total.get("generation_share"),
                    # the same without loading the weights (setup), which a running service pays once
                    "generation_share_after_setup": _share_after_setup(self.timings), "stages": self.timings}
        path = self.run_dir / "timings.json"
        path.write_text(json.dumps(document, indent=2, default=str))
        return path

    def _stages(self, backend: CalibrationBackend, prompts: PromptSets, study: optuna.Study,
                tracker: Tracker | NullTracker, parent: str) -> Path | None:
        cfg, stages = self.cfg, set(self.cfg.stages)
        if "evaluate" in stages:
            with self._stage("evaluate"):
                self.artifacts["evaluate"] = self.evaluate(backend, prompts, tracker, parent)
            if stages == {"evaluate"}:
                return None
        fresh = None
        if "presample" in stages:
            with self._stage("presample"):
                fresh = self.presample(backend, prompts)
        summary = self.shared_summary(study, fresh)
        tracker.log_params(parent, {"presample": summary.to_json()})
        space = SearchSpace.from_config(cfg.search.space, summary)
        factory = PolicyFactory(summary, backend.name)
        evaluator = geneval_scorer(backend.name)

        if not ({"search", "select", "export"} & stages):
            return None
        scorer = self._scorer(backend, prompts.search, factory, evaluator, "search")
        if "search" in stages:
            with self._stage("search"):
                self.search(study, scorer, space, tracker)
        if not ({"select", "export"} & stages):
            with self._stage("report"):
                self.artifacts["search"] = self.report_search(study)
            return None

        with self._stage("validate"):
            validator = self._scorer(backend, prompts.validate, factory, evaluator, "validate")
            test = sequential_test(cfg.search.acceptance, len(prompts.validate), evaluator is not None,
                                   clip=self.clip is not None)
            selection = select_and_validate(study, lambda params: validator.validate(factory(params), test, "validate"),
                                            cfg.search.validate_candidates)
        with self._stage("report"):
            self.artifacts["search"] = self.report_search(study, selection)
            self.artifacts["grids"] = self._grids(selection, factory, scorer, validator)
            self.artifacts["validation"] = [self._write_paired(selection, validator)]
            verdict = selection.validation.verdict
            tracker.log_metrics(parent, {f"validation.{k}": v for k, v in selection.validation.scores.metrics().items()})
            tracker.log_metrics(parent, {f"acceptance.{k}": v for k, v in verdict.metrics().items()})
            tracker.log_metrics(parent, {f"search.{k}": v for k, v in selection.trial.user_attrs.get("metrics", {}).items()})
            tracker.set_tags(parent, {"selected_trial": selection.trial.number, "validated": selection.passed,
                                      "acceptance": verdict.decision})
        if "export" not in stages:
            return None
        with self._stage("export"):
            path = self.export(selection, factory, backend, prompts, study, space, summary, scorer, tracker)
        self.artifacts["policy"] = [path]
        return path

    def _scorer(self, backend: CalibrationBackend, prompt_set, build_policy, evaluator, desc: str) -> PolicyScorer:
        cfg = self.cfg.search
        return PolicyScorer(backend, prompt_set, build_policy, cost=self.cost, latency=cfg.latency, evaluator=evaluator,
                            geneval_score=cfg.acceptance.score, desc=desc, clip=self.clip)

    def evaluate(self, backend: CalibrationBackend, prompts: PromptSets, tracker, parent: str) -> list[Path]:
        """Measure existing policies on every held-out prompt with the validation code; a table with
        each policy's one-sided bounds and decision at `search.acceptance` (one look: all prompts)."""
        import dataclasses

        import pandas as pd
        from tqdm.auto import tqdm

        from toprovar.policy import load_policy

        policies = [(name, load_policy(name, backend.name)) for name in self.cfg.evaluate]  # fail before work
        evaluator = geneval_scorer(backend.name)
        acceptance = self.cfg.search.acceptance
        scorer = self._scorer(backend, prompts.validate, lambda params: params, evaluator, "evaluate")
        test: SequentialTest = sequential_test(acceptance, len(prompts.validate), evaluator is not None,
                                               clip=self.clip is not None)
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
        shown = [c for c in ("policy", "speedup", "ssim", "acceptance.ssim.lower", "geneval_drop",
                             "acceptance.geneval_drop.upper", "prompts_lost", "prompts_won", "decision", "kept_share",
                             "D_mean") if c in frame]
        reference = scorer.reference()
        unpruned = f"{float(reference.scores[acceptance.score].mean()):.4f}" if reference.scores else "n/a"
        log.info("%d policies on %d held-out prompts (unpruned geneval-lite %s %s; bounds one-sided at %g):\n%s",
                 len(rows), len(prompts.validate), acceptance.score, unpruned, acceptance.confidence,
                 frame[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        with self.clock.section("pictures"):
            grid = plots.plot_policies_grid(images, prompts.validate.texts, folder / "unpruned_vs_policies.png").path
        self.pictures["evaluate_grid"] = (grid, 0)
        return [folder / "policies.csv", grid]

    def _grids(self, selection: Selection, factory: PolicyFactory, search: PolicyScorer,
               validator: PolicyScorer) -> list[Path]:
        """Unpruned (top row) over the selected policy (bottom row), one column per prompt: every
        search prompt (generated again with the policy) and the first `GRID_HELD_OUT` held-out
        prompts the validation used (its own images); each policy image noted with its SSIM and
        score changes, framed red / green where its prompt was lost / won. Cells ≤ 256 px."""
        folder = self.run_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        number = selection.trial.number
        run, ref, paired = search.run_paired(factory(selection.trial.params), desc="grid: search prompts")
        # Lost / won by the score acceptance bounds: geneval-lite where the backbone has it, else CLIPScore.
        mark_key = next((k for k in (f"geneval_drop.{self.cfg.search.acceptance.score}", "clip_drop") if k in paired),
                        None)
        held_out = selection.validation
        shown = min(GRID_HELD_OUT, len(held_out.paired["ssim"]))
        files = []
        with self.clock.section("pictures"):
            for name, unpruned, pruned, values, prompts, title in (
                    ("search", ref.images, run.images, paired, search.prompts.texts,
                     f"Search prompts (all {len(run)}), trial {number}"),
                    ("validate", validator.reference(shown).images, held_out.scores.images[:shown],
                     {k: v[:shown] for k, v in held_out.paired.items()}, validator.prompts.texts,
                     f"Held-out prompts: the first {shown} of the {len(held_out.paired['ssim'])} validation used "
                     f"({len(validator.prompts)} in the set), trial {number}, {held_out.verdict.decision}")):
                layout = plots.plot_policy_grid(unpruned, pruned, prompts, values,
                                                folder / f"{name}_unpruned_vs_policy.png", title,
                                                policy_label=f"policy (trial {number})", mark_key=mark_key)
                files.append(layout.path)
                self.pictures[f"grid_{name}"] = (layout.path, number)
        return files

    def _write_paired(self, selection: Selection, validator: PolicyScorer) -> Path:
        """validation/per_prompt.csv: every probe's per-prompt paired values (what its bounds rest on)."""
        import pandas as pd

        frames = [pd.DataFrame({"trial": number, "decision": result.verdict.decision,
                                "prompt": range(len(result.paired["ssim"])),
                                "seed": validator.prompts.seeds[:len(result.paired["ssim"])], **result.paired})
                  for number, result in selection.tried]
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


def asdict_sets(prompts: PromptSets) -> dict[str, Any]:
    return {"presample": prompts.presample, "search": prompts.search, "validate": prompts.validate}

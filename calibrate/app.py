"""The calibration run: pre-sample → search → select and validate → export, tracked in MLflow.

Everything lands in the Hydra run folder (tables, plots, image grids, the Optuna SQLite study,
policy.yaml) and, as artifacts, in one MLflow parent run with a child run per trial.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from calibrate import plots
from calibrate.acceptance import SequentialTest, sequential_test
from calibrate.backend import CalibrationBackend, load_backend
from calibrate.config import CalibrationConfig
from calibrate.export import (check_loads, copy_to, git_commit, portable_path, prompts_record, redact_url, versions,
                              write_policy)
from calibrate.objective import PolicyScorer, resolve_cost
from calibrate.knobs import PolicyFactory, SearchSpace, paper_defaults
from calibrate.presample import PresampleSummary, run_presample, write_tables
from calibrate.prompts import PromptSets, load_prompt_sets
from calibrate.quality import geneval_scorer
from calibrate.search import completed, open_study, pareto_front, run_search, trial_summary, trials_frame
from calibrate.select import Selection, select_and_validate
from calibrate.tracking import NullTracker, Tracker, open_tracker
from toprovar.errors import UserError
from toprovar.models.registry import resolve_device, resolve_dtype

log = logging.getLogger("calibrate")

STUDY_PRESAMPLE_KEY = "presample_summary"


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
        self.timings: dict[str, float] = {}
        self.artifacts: dict[str, list[Path]] = {}

    # -- stages -----------------------------------------------------------------------------------
    def presample(self, backend: CalibrationBackend, prompts: PromptSets) -> PresampleSummary:
        result = run_presample(backend, prompts.presample, self.cfg.search.constraints.min_ssim)
        folder = self.run_dir / "presample"
        files = write_tables(result, folder)
        files.append(plots.plot_entropy_and_rho(result.scales, result.images, result.summary.tau_range,
                                                self.cfg.search.constraints.min_ssim, folder / "fig8_entropy_rho.png"))
        if len(result.layers):
            files.append(plots.plot_layer_heatmap(result.layers, result.summary.representative_scale,
                                                  folder / "layer_ratio_heatmap.png"))
        exits = [result.exit_images[s] for s in sorted(result.exit_images)] + [result.full_images]
        files.append(plots.save_image_grid(exits, folder / "early_exits.png"))
        self.artifacts["presample"] = files
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

    def report_search(self, study: optuna.Study, chosen: int | None = None) -> list[Path]:
        folder = self.run_dir / "search"
        folder.mkdir(parents=True, exist_ok=True)
        frame = trials_frame(study)
        frame.to_csv(folder / "trials.csv", index=False)
        frame.to_parquet(folder / "trials.parquet", index=False)
        front = pareto_front(study)
        (folder / "pareto_front.json").write_text(json.dumps([trial_summary(t) for t in front], indent=2))
        files = [folder / "trials.csv", folder / "trials.parquet", folder / "pareto_front.json"]
        files.append(plots.plot_pareto(frame, [t.number for t in front], self.cfg.search.constraints.min_ssim,
                                       folder / "pareto.png", chosen))
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
        # Build first: a missing weight file or prompt file fails in a second, before any tracking.
        t0 = time.perf_counter()
        backend = load_backend(cfg.backbone, self.device, resolve_dtype(cfg.dtype),
                               batch_size=cfg.batch_size)
        prompts = load_prompt_sets(cfg.prompts)
        study = open_study(cfg.study_name, cfg.storage, cfg.search.sampler, cfg.seed, cfg.search.n_trials)
        self._timed("setup", t0)
        tracker = open_tracker(cfg.tracking, self.run_dir, self.launch_dir)
        parent = tracker.start_parent(f"{cfg.backbone_name}/{cfg.study_name}", _parent_params(cfg),
                                      tags={"backbone": cfg.backbone_name, "run_dir": str(self.run_dir)})
        ok = False
        try:
            policy_path = self._stages(backend, prompts, study, tracker, parent)
            ok = True
            return policy_path
        finally:
            self._log_files(tracker, parent)
            tracker.log_metrics(parent, {f"time_s.{k}": v for k, v in self.timings.items()})
            tracker.end(parent, ok=ok)

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 2)
        log.info("%s took %.1f s", name, self.timings[name])

    def _stages(self, backend: CalibrationBackend, prompts: PromptSets, study: optuna.Study,
                tracker: Tracker | NullTracker, parent: str) -> Path | None:
        cfg, stages = self.cfg, set(self.cfg.stages)
        if "evaluate" in stages:
            t0 = time.perf_counter()
            self.artifacts["evaluate"] = self.evaluate(backend, prompts, tracker, parent)
            self._timed("evaluate", t0)
            if stages == {"evaluate"}:
                return None
        fresh = None
        if "presample" in stages:
            t0 = time.perf_counter()
            fresh = self.presample(backend, prompts)
            self._timed("presample", t0)
        summary = self.shared_summary(study, fresh)
        tracker.log_params(parent, {"presample": summary.to_json()})
        space = SearchSpace.from_config(cfg.search.space, summary)
        factory = PolicyFactory(summary, backend.name)
        evaluator = geneval_scorer(backend.name)

        if not ({"search", "select", "export"} & stages):
            return None
        t0 = time.perf_counter()
        scorer = PolicyScorer(backend, prompts.search, factory, cost=self.cost, latency=cfg.search.latency,
                              evaluator=evaluator, geneval_score=cfg.search.acceptance.score, desc="search")
        if "search" in stages:
            self.search(study, scorer, space, tracker)
            self._timed("search", t0)
        if not ({"select", "export"} & stages):
            self.artifacts["search"] = self.report_search(study)
            return None

        t0 = time.perf_counter()
        validator = PolicyScorer(backend, prompts.validate, factory, cost=self.cost, latency=cfg.search.latency,
                                 evaluator=evaluator, geneval_score=cfg.search.acceptance.score, desc="validate")
        test = sequential_test(cfg.search.acceptance, len(prompts.validate), evaluator is not None)
        selection = select_and_validate(study, lambda params: validator.validate(factory(params), test, "validate"),
                                        cfg.search.validate_candidates)
        self._timed("validate", t0)
        self.artifacts["search"] = self.report_search(study, chosen=selection.trial.number)
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
        path = self.export(selection, factory, backend, prompts, study, space, summary, scorer, tracker)
        self.artifacts["policy"] = [path]
        return path

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
        scorer = PolicyScorer(backend, prompts.validate, lambda params: params, cost=self.cost,
                              latency=self.cfg.search.latency, evaluator=evaluator, geneval_score=acceptance.score,
                              desc="evaluate")
        test: SequentialTest = sequential_test(acceptance, len(prompts.validate), evaluator is not None)
        test = dataclasses.replace(test, batch=test.budget)  # a measurement: every prompt, one look
        rows, images = [], [scorer.reference().images]
        for name, policy in tqdm(policies, desc="evaluate", unit="policy", dynamic_ncols=True):
            result = scorer.validate(policy, test)
            metrics = {**result.scores.metrics(), **{f"acceptance.{k}": v for k, v in result.verdict.metrics().items()}}
            rows.append({"policy": name, **metrics, "decision": result.verdict.decision})
            images.append(result.scores.images)
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
        grid = plots.save_image_grid(images, folder / "unpruned_vs_policies.png")
        return [folder / "policies.csv", grid]

    def _grids(self, selection: Selection, factory: PolicyFactory, search: PolicyScorer,
               validator: PolicyScorer) -> list[Path]:
        """Unpruned (top row) over the selected policy (bottom row) for the search and held-out prompts;
        the held-out row is the validation's own images (the prompts it used), the search row is generated again."""
        folder = self.run_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        searched = search.backend.generate(search.prompts.texts, search.prompts.seeds,
                                           policy=factory(selection.trial.params)).images
        held_out = selection.validation.scores.images  # the prompts the sequential validation used
        return [plots.save_image_grid([scorer.reference(len(pruned)).images, pruned],
                                      folder / f"{scorer.prompts.name}_unpruned_vs_policy.png")
                for scorer, pruned in ((search, searched), (validator, held_out))]

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
        for folder, files in self.artifacts.items():
            if folder == "grids" and not self.cfg.tracking.log_images:
                continue
            tracker.log_artifacts(parent, files, folder)


def asdict_sets(prompts: PromptSets) -> dict[str, Any]:
    return {"presample": prompts.presample, "search": prompts.search, "validate": prompts.validate}

"""Stage 1, pre-sampling: ρ_s, τ and the layer ratios of the unpruned backbone, written as tables
and pictures; its summary goes into the study, where every worker and every resumed run reads it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import optuna

from calibrate import plots
from calibrate.config import StorageConfig
from calibrate.context import Output, RunContext
from calibrate.cost_model import CostModel, call_errors, fit_cost_model
from calibrate.knobs import PolicyFactory, SearchSpace, probe_layer_counts
from calibrate.presample import PresampleSummary, run_presample, write_tables
from calibrate.search import POLL_S, open_storage
from calibrate.storage_url import storage_file
from toprovar.errors import UserError

log = logging.getLogger("calibrate")

STUDY_PRESAMPLE_KEY = "presample_summary"


def run(ctx: RunContext) -> tuple[PresampleSummary, Output]:
    """Pre-sample the `presample` prompts: the summary and the files written to presample/."""
    min_ssim = ctx.cfg.search.constraints.min_ssim
    prompts = ctx.prompts.presample
    result = run_presample(ctx.backend, prompts, min_ssim, other_probe_layers=probe_layer_counts(ctx.cfg.search.space))
    folder = ctx.run_dir / "presample"
    files = write_tables(result, folder)
    with ctx.clock.section("pictures"):
        files.append(
            plots.plot_entropy_and_rho(
                result.scales, result.images, result.summary.tau_range, min_ssim, folder / "fig8_entropy_rho.png"
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
                prompts.texts,
                folder / "early_exits.png",
            ).path
        )
    log.info(
        "pre-sampling: ρ_s crossing %s, τ range %s, representative scale %d, %d band points",
        result.summary.crossing,
        result.summary.tau_range,
        result.summary.representative_scale,
        result.summary.band_points,
    )
    pictures = {"early_exits": (files[-1], 0), "fig8_entropy_rho": (folder / "fig8_entropy_rho.png", 0)}
    summary = result.summary
    if ctx.cost == "model":
        model, record = cost_model(ctx, result)
        summary = dataclasses.replace(summary, cost_model=model.to_json())
        path = folder / "cost_model.json"
        path.write_text(json.dumps(record, indent=2))
        files.append(path)
    return summary, Output(files, pictures)


def cost_model(ctx: RunContext, result) -> tuple[CostModel, dict]:
    """The CPU search's cost model (calibrate.cost_model) and what to record of it: the backbone's
    stored coefficients (`search.cost_model.source=auto` and the backbone config has `cost_model:`;
    their error on this machine's pre-sampling calls is logged), else a fit on the pre-sampling's
    timed calls plus `search.cost_model.probes` random policies of the search space on its prompts."""
    cfg, backend = ctx.cfg, ctx.backend
    spec = backend.backbone.spec
    stored = ctx.cfg.backbone.get("cost_model")
    traces = list(result.traces)
    if cfg.search.cost_model.source == "fit" or not stored:
        space = SearchSpace.from_config(cfg.search.space, result.summary)
        factory = PolicyFactory(result.summary, backend.name)
        draws = space.random_params(cfg.seed)
        prompts = ctx.prompts.presample
        for _ in range(cfg.search.cost_model.probes):
            policy = factory(next(draws))
            traces.extend(backend.generate(prompts.texts, prompts.seeds, policy=policy).traces)
    fit = fit_cost_model(traces, spec, fitted_on=f"{len(traces)} pre-sampling calls on {ctx.device}")
    record = {"fitted": fit.model.to_json(), "fit_calls": fit.calls, "fit_mean_abs_error": fit.mean_abs_error}
    if cfg.search.cost_model.source == "auto" and stored:
        model = CostModel.from_json({**stored, "fitted_on": "backbone config (cost_model)"})
        errors = call_errors(model, traces, spec)
        record.update(used="backbone", stored_mean_abs_error=float(np.mean(np.abs(errors))))
        log.info(
            "cost model: the backbone's (mean error %.1f %% on this machine's %d pre-sampling calls; "
            "refitted here: %.1f %%; search.cost_model.source=fit uses the refit)",
            100 * record["stored_mean_abs_error"],
            len(errors),
            100 * fit.mean_abs_error,
        )
    else:
        model = fit.model
        record["used"] = "fitted"
        log.info("cost model fitted on %d timed calls: mean error %.1f %%", fit.calls, 100 * fit.mean_abs_error)
    record["model"] = model.to_json()
    return model, record


def stored_summary(study: optuna.Study) -> PresampleSummary | None:
    """The summary the study holds, None before its first pre-sampling."""
    stored = study.user_attrs.get(STUDY_PRESAMPLE_KEY)
    return None if stored is None else PresampleSummary.from_json(stored)  # JSON: lists for tuples


def missing_summary(study: optuna.Study) -> UserError:
    return missing_summary_named(study.study_name)


def check_summary_stored(name: str, storage: StorageConfig) -> None:
    """UserError unless study `name` in `storage` holds a pre-sampling summary: for a run that needs
    one without pre-sampling (e.g. stages=[select,export]), checked before any weights load. Creates
    no file: a journal or SQLite file that does not exist holds no study."""
    if storage.url is None:  # in memory: every process starts with an empty storage
        raise missing_summary_named(name)
    path = storage_file(storage.url)
    if (path is not None and not path.is_file()) or storage.url.startswith("sqlite") and path is None:
        raise missing_summary_named(name)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:  # no study of that name in the storage
        raise missing_summary_named(name) from None
    if STUDY_PRESAMPLE_KEY not in study.user_attrs:
        raise missing_summary(study)


def missing_summary_named(name: str) -> UserError:
    return UserError(
        f"study {name!r} has no pre-sampling summary yet; "
        f"run with the presample stage first (stages=[presample,search])"
    )


def shared_summary(study: optuna.Study, fresh: PresampleSummary | None) -> PresampleSummary:
    """The study's pre-sampling facts: the first worker's win, so every trial sees the same space."""
    kept = stored_summary(study)
    if kept is not None:
        if fresh is not None and fresh != kept:
            log.info("study %r keeps the pre-sampling summary it started with", study.study_name)
        return kept
    if fresh is None:
        raise missing_summary(study)
    study.set_user_attr(STUDY_PRESAMPLE_KEY, fresh.to_json())
    return fresh


def wait_for_summary(study: optuna.Study) -> None:
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

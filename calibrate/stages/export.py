"""Stage 5, export: policy.yaml in the run folder with the record of how it was made (provenance),
checked to load, and copied to `export_to` when asked."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from calibrate.backend import weights_fingerprint
from calibrate.context import RunContext
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
from calibrate.knobs import PolicyFactory, SearchSpace
from calibrate.presample import PresampleSummary
from calibrate.prompts import PromptSets
from calibrate.search import completed, hold_for_crash_test
from calibrate.select import Selection
from toprovar.environment import device_name

log = logging.getLogger("calibrate")


def run(
    ctx: RunContext, selection: Selection, factory: PolicyFactory, space: SearchSpace, summary: PresampleSummary
) -> Path:
    """Write the selected trial's policy; returns the run folder's policy.yaml."""
    trial, backend = selection.trial, ctx.backend
    path = write_policy(
        factory.document(trial.params), provenance(ctx, selection, space, summary), ctx.run_dir / "policy.yaml"
    )
    check_loads(path, backend.name)
    verdict = selection.validation.verdict
    log.info(
        "policy written to %s (trial %d: held-out speedup %s on %s, SSIM %.3f; %s at %d%% confidence after %d "
        "prompts%s)",
        path,
        trial.number,
        selection.validation.scores.speedups(),
        ctx.device,
        selection.validation.scores.ssim,
        verdict.decision,
        round(100 * verdict.confidence),
        verdict.prompts,
        "" if selection.passed else ", NOT validated",
    )
    if ctx.cfg.export_to:
        copied = copy_to(path, ctx.paths.launched(ctx.cfg.export_to), backend.name)
        log.info("policy copied to %s", copied)
    hold_for_crash_test("export")
    return path


def provenance(ctx: RunContext, selection: Selection, space: SearchSpace, summary: PresampleSummary) -> dict[str, Any]:
    """How the policy was made: weights, prompts, search, measurements, the acceptance promise."""
    cfg, backend, study, trial, tracker = ctx.cfg, ctx.backend, ctx.study, selection.trial, ctx.tracker
    return {
        "calibrated": True,
        "validated": selection.passed,
        "backbone": {
            "name": backend.name,
            "weights": {k: portable_path(v) for k, v in backend.weights.items()},
            "weight_hashes": backend.fingerprint(),
            "settings": backend.settings,
        },
        "prompts": {"source": cfg.prompts.source, **prompts_record(_sets(ctx.prompts))},
        "search": {
            "space": space.as_dict(),
            "sampler": cfg.search.sampler,
            "objective": ctx.cost,
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
        # What a user sees: the wall clock measured on the held-out prompts on this device; the FLOP
        # ratio and the cost model's prediction beside it, named as such.
        "speedup": speedup_record(ctx, selection),
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
        "device": str(ctx.device),
        "versions": versions(),
        "git_commit": git_commit(ctx.paths.launch_dir),
        "command": "python -m calibrate " + " ".join(ctx.paths.overrides),
        "mlflow": {
            "tracking_uri": redact_url(getattr(ctx.tracker, "uri", None)),
            "parent_run_id": getattr(tracker, "parent_id", None),
        },
    }


def speedup_record(ctx: RunContext, selection: Selection) -> dict[str, Any]:
    """The validated speedup: measured wall clock (scale loop + VAE decode, text encoding excluded)
    on the held-out prompts and device, the FLOP ratio, the predicted one and its error."""
    extra = selection.validation.scores.extra
    return {
        "wall_clock": extra.get("wall_speedup"),
        "device": str(ctx.device),
        "device_name": device_name(ctx.device),
        "threads": torch.get_num_threads(),
        "prompts": int(extra.get("prompts", 0)),
        "flop_ratio": extra.get("flop_speedup"),
        "predicted": extra.get("predicted_speedup"),
        "prediction_error": extra.get("prediction_error"),
        "search_objective": ctx.cost,
    }


def _sets(prompts: PromptSets) -> dict[str, Any]:
    return {"presample": prompts.presample, "search": prompts.search, "validate": prompts.validate}

"""The calibration's one MLflow parent run: which process starts it, continues it or only logs into
it. Its id is kept with the study (`STUDY_MLFLOW_KEY`), so a resumed run continues the same parent."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from calibrate.config import CalibrationConfig
from calibrate.export import redact_url
from calibrate.tracking import NullTracker, Tracker

STUDY_MLFLOW_KEY = "mlflow_parent"  # {"tracking_uri", "run_id"}: the calibration's parent run


def parent_params(cfg: CalibrationConfig) -> dict[str, Any]:
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


def open_parent(
    cfg: CalibrationConfig, tracker: Tracker | NullTracker, study: optuna.Study | None, run_dir: Path, joins: bool
) -> tuple[str, bool]:
    """The parent run and whether this process ends it: the one stored with the study when it is in
    this tracking store (continued; a joining worker, `joins`, only logs into it), else a new one,
    stored with the study."""
    params = parent_params(cfg)
    stored = study.user_attrs.get(STUDY_MLFLOW_KEY) if study is not None else None
    if stored is not None and stored.get("tracking_uri") == redact_url(tracker.uri) and tracker.uri:
        if joins:
            tracker.attach(stored["run_id"])
            return stored["run_id"], False
        if tracker.resume_parent(stored["run_id"], params):
            return stored["run_id"], True
    parent = tracker.start_parent(
        f"{cfg.backbone_name}/{cfg.study_name}",
        params,
        tags={"backbone": cfg.backbone_name, "run_dir": str(run_dir)},
    )
    if study is not None and tracker.parent_id and not joins:
        study.set_user_attr(STUDY_MLFLOW_KEY, {"tracking_uri": redact_url(tracker.uri), "run_id": parent})
    return parent, True

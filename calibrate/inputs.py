"""What a calibration process checks and opens before any stage: the input's mistakes (one-line
errors before any weights load), then the backbone, the prompt sets, the CLIP scorer and the cost."""

from __future__ import annotations

import logging
from typing import Any

import torch

from calibrate.backend import load_backend
from calibrate.config import CalibrationConfig
from calibrate.context import RunPaths
from calibrate.folders import check_writable_folder
from calibrate.objective import resolve_cost
from calibrate.prompts import load_prompt_sets
from calibrate.quality import ClipScorer, check_clip_folder
from calibrate.stages import evaluate, presample
from calibrate.timing import Clock
from toprovar.models.registry import resolve_dtype

log = logging.getLogger("calibrate")


def check_inputs(cfg: CalibrationConfig, paths: RunPaths) -> list[tuple[str, Any]]:
    """What can be wrong in the input, found before any weights load (one-line UserError each); the
    evaluate stage's policies, checked against the schema and the backbone (no weights)."""
    stages = set(cfg.stages)
    if cfg.quality.clip is not None:
        check_clip_folder(cfg.quality.clip)
    if cfg.export_to and "export" in stages:  # not only after the whole run
        check_writable_folder(paths.launched(cfg.export_to), "export_to")
    if "presample" not in stages and stages & {"search", "select", "export"} and not cfg.joins_only:
        presample.check_summary_stored(cfg.study_name, cfg.storage)  # a joining worker waits for it instead
    return evaluate.check_policies(cfg) if "evaluate" in stages else []


def load(cfg: CalibrationConfig, device: torch.device, clock: Clock) -> tuple:
    """The backbone, the prompt sets and the CLIP scorer (None without quality.clip)."""
    backend = load_backend(cfg.backbone, device, resolve_dtype(cfg.dtype), batch_size=cfg.batch_size, clock=clock)
    prompts = load_prompt_sets(cfg.prompts)
    return backend, prompts, ClipScorer(cfg.quality.clip, device) if cfg.quality.clip is not None else None


def objective(cfg: CalibrationConfig, device: torch.device) -> str:
    """The cost the search ranks trials by (model | flops | latency), with a warning for latency off a GPU."""
    cost = resolve_cost(cfg.search.objective, device)
    if cost == "latency" and device.type != "cuda":
        log.warning(
            "search.objective=latency on %s: wall-clock timings of a trial are noisy; model (the predicted "
            "wall clock) is the CPU default",
            device,
        )
    return cost

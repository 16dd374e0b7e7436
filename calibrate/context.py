"""What every stage of a calibration reads: one frozen `RunContext`, built once the backbone, the
prompts, the study and the MLflow tracker are open (calibrate.app builds it, the stages only read it).

The objects it holds own their state (the clock its counters, the study its storage, the tracker its
MLflow client); the context itself never changes, so a stage's inputs are its arguments and this.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from calibrate.backend import CalibrationBackend
from calibrate.config import CalibrationConfig
from calibrate.cost_model import CostModel
from calibrate.objective import PolicyScorer
from calibrate.prompts import PromptSet, PromptSets
from calibrate.quality import ClipScorer
from calibrate.timing import Clock
from calibrate.tracking import NullTracker, Tracker


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes (`run_dir`), where it was launched from, and the overrides it was given."""

    run_dir: Path
    launch_dir: Path
    overrides: tuple[str, ...]

    def resume_command(self) -> str:
        """The command that continues this run: the same overrides, the same run folder."""
        args = [a for a in self.overrides if not a.startswith("hydra.run.dir=")]
        return shlex.join(["python", "-m", "calibrate", *args, f"hydra.run.dir={self.run_dir}"])

    def launched(self, path: str) -> Path:
        """A path the user gave, relative to the launch folder unless absolute."""
        return Path(path) if Path(path).is_absolute() else self.launch_dir / path


@dataclass(frozen=True)
class Output:
    """What a stage wrote: its files (MLflow artifacts in its folder) and the pictures among them
    that MLflow also shows as images (key -> (file, step))."""

    files: list[Path]
    pictures: dict[str, tuple[Path, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """One calibration process: its config and paths, and the open backbone, prompts, CLIP scorer,
    study and MLflow tracker (`parent`: the calibration's parent run, None in a joining worker)."""

    cfg: CalibrationConfig
    paths: RunPaths
    device: torch.device
    cost: str  # model | flops | latency (calibrate.objective.resolve_cost)
    clock: Clock
    backend: CalibrationBackend
    prompts: PromptSets
    clip: ClipScorer | None
    study: optuna.Study | None
    tracker: Tracker | NullTracker
    parent: str | None

    @property
    def run_dir(self) -> Path:
        return self.paths.run_dir

    def cost_model(self, summary: Any = None) -> CostModel | None:
        """The study's cost model (its pre-sampling summary's), else the backbone config's stored
        one (`cost_model:`), else None."""
        found = getattr(summary, "cost_model", None) or self.cfg.backbone.get("cost_model")
        return None if not found else CostModel.from_json(found)

    def scorer(
        self,
        prompt_set: PromptSet,
        build_policy: Callable[[Any], Any] | None,
        evaluator,
        desc: str,
        summary: Any = None,
    ):
        """A `PolicyScorer` of `prompt_set` with this run's cost, latency settings, CLIP scorer and
        cost model (`cost_model(summary)`; without one the `model` cost falls back to FLOPs, which
        only a measurement without a study, the evaluate stage, meets)."""
        search = self.cfg.search
        model = self.cost_model(summary)
        return PolicyScorer(
            self.backend,
            prompt_set,
            build_policy,
            cost="flops" if self.cost == "model" and model is None else self.cost,
            cost_model=model,
            latency=search.latency,
            evaluator=evaluator,
            geneval_score=search.acceptance.score,
            desc=desc,
            clip=self.clip,
        )

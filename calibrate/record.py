"""What a calibration process keeps for the end of its run: each stage's timing record and output.

`RunRecord` is the one mutable object of a run besides those the context holds: the orchestrator
(calibrate.app) adds each stage's `Output` and timing, then writes timings.json and hands every file
to the MLflow parent run. Stages never see it; they return what they wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from calibrate.context import Output, RunContext
from calibrate.timing import Clock
from calibrate.tracking import NullTracker, Tracker

log = logging.getLogger("calibrate")


class RunRecord:
    """Stage timings (calibrate.timing records), files by MLflow folder and pictures by MLflow key."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.timings: dict[str, dict] = {}
        self.files: dict[str, list[Path]] = {}
        self.pictures: dict[str, tuple[Path, int]] = {}
        self._start = clock.snapshot()

    def add(self, folder: str, output: Output) -> None:
        self.files[folder] = list(output.files)
        self.pictures.update(output.pictures)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage: its record goes to `timings[name]`, one log line says where the time went."""
        self.clock.reset_peak_memory()
        start = self.clock.snapshot()
        try:
            yield
        finally:
            record = {**self.clock.record(start), **self.clock.peak_memory_gib()}
            self.timings[name] = record
            rate = record["images_per_s_generating"]
            generating = (
                f"{100 * (record['generation_share'] or 0):.0f}% generating, {record['images']} images, "
                f"{rate:.1f} images/s while generating"
                if record["images"] and rate is not None
                else "no generation"
            )
            log.info("%s took %.1f s (%s)", name, record["wall_s"], generating)

    def close(self, ctx: RunContext, status: str) -> None:
        """The end of the process that owns the parent run: every file and picture, timings.json and
        the time metrics to MLflow, and the parent run ended with `status`."""
        tracker, parent = ctx.tracker, ctx.parent
        with self.stage("tracking"):
            self._log_files(tracker, parent, ctx.cfg.tracking.log_images)
        self.timings["total"] = self.clock.record(self._start)
        path = self.write_timings(ctx)
        tracker.log.artifacts(parent, [path])
        tracker.log.metrics(
            parent,
            {
                f"time.{stage}.{k}": v
                for stage, record in self.timings.items()
                for k, v in record.items()
                if isinstance(v, (int, float))
            },
        )
        tracker.end(parent, status=status)

    def _log_files(self, tracker: Tracker | NullTracker, parent: str, log_images: bool) -> None:
        """Every file as an artifact in its folder; the pictures also as MLflow images (with steps:
        the selected trial for the grids, the complete trials for the Pareto plot)."""
        for folder, files in self.files.items():
            if folder == "grids" and not log_images:
                continue
            tracker.log.artifacts(parent, files, folder)
        if log_images:
            for key, (path, step) in self.pictures.items():
                if path.exists():
                    tracker.log.image(parent, path, key, step)

    def write_timings(self, ctx: RunContext) -> Path:
        """timings.json: each stage's record, the run's total, the device and the batch size."""
        total = self.timings.get("total", {})
        peaks = [r.get("peak_allocated_gib") for r in self.timings.values() if r.get("peak_allocated_gib") is not None]
        document = {
            "backbone": ctx.backend.name,
            "device": str(ctx.device),
            "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None,
            "batch_size": ctx.backend.batch_size,
            "settings": ctx.backend.settings,
            "objective": ctx.cost,
            "trials": ctx.cfg.search.n_trials,
            "prompts": {k: getattr(ctx.cfg.prompts, k) for k in ("presample", "search", "validate")},
            "peak_allocated_gib": max(peaks) if peaks else None,
            "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0) for r in self.timings.values())
            if peaks
            else None,
            "generation_share": total.get("generation_share"),
            # the same without loading the weights (setup), which a running service pays once
            "generation_share_after_setup": _share_after_setup(self.timings),
            "stages": self.timings,
        }
        path = ctx.run_dir / "timings.json"
        path.write_text(json.dumps(document, indent=2, default=str))
        return path


def _share_after_setup(timings: dict[str, dict]) -> float | None:
    stages = [r for name, r in timings.items() if name not in ("setup", "total")]
    wall = sum(r["wall_s"] for r in stages)
    return round(sum(r["generation_s"] for r in stages) / wall, 4) if wall > 0 else None

"""Where a calibration's wall time goes: per stage, generation vs everything else, images per second,
peak GPU memory — written to `timings.json` in the run folder and logged to MLflow.

One `Clock` per run. The backend adds every generate call to it (`generation`: the call's wall
time, synchronized — the pipeline reads its CUDA events and copies the images to the host before it
returns — and the GPU time its traces measured); the scorers time quality metrics (`quality`:
SSIM, geneval-lite, CLIP), the app its pictures (`pictures`) and MLflow calls (`tracking`). A
stage's record is the difference of two snapshots; what no section claims (Optuna, tables, host
work between calls) is `other_s`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SECTIONS = ("generation", "quality", "pictures", "tracking")
GIB = float(1 << 30)


class Clock:
    """Seconds per section and generation counters, accumulated over the run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)  # images, padding, timing-only, calls, gpu_ms, text_ms

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def count(self, **values: float) -> None:
        for key, value in values.items():
            self.counts[key] += value

    def snapshot(self) -> dict:
        return {"time": time.perf_counter(), "seconds": dict(self.seconds), "counts": dict(self.counts)}

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self) -> dict[str, float | None]:
        """Peak GPU memory since the last reset: allocated by tensors and reserved by the caching
        allocator (None off CUDA)."""
        if self.device.type != "cuda":
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2),
        }

    def record(self, start: dict, end: dict | None = None) -> dict:
        """The stage between two snapshots: wall time, each section's seconds, generation's share of
        the wall time, images and images per second (per second of generation and of the stage)."""
        end = end or self.snapshot()
        wall = end["time"] - start["time"]
        sections = {name: end["seconds"].get(name, 0.0) - start["seconds"].get(name, 0.0) for name in SECTIONS}
        counts = {
            key: end["counts"].get(key, 0.0) - start["counts"].get(key, 0.0)
            for key in ("images", "padded_images", "timing_only_images", "generate_calls", "gpu_ms", "text_ms")
        }
        generating = sections["generation"]
        images = int(counts["images"])
        return {
            "wall_s": round(wall, 3),
            **{f"{name}_s": round(v, 3) for name, v in sections.items()},
            "other_s": round(wall - sum(sections.values()), 3),
            "generation_share": round(generating / wall, 4) if wall > 0 else None,
            "generation_gpu_s": round(counts["gpu_ms"] / 1e3, 3),  # the traces' events: scale loop + VAE decode
            "text_encode_s": round(counts["text_ms"] / 1e3, 3),  # part of generation_s: the text encoder
            "images": images,
            "padded_images": int(counts["padded_images"]),
            "timing_only_images": int(counts["timing_only_images"]),
            "generate_calls": int(counts["generate_calls"]),
            "images_per_s_generating": round(images / generating, 3) if generating > 0 else None,
            "images_per_s_stage": round(images / wall, 3) if wall > 0 else None,
        }


class Timed:
    """`target` with every method call counted under `clock`'s `section` (e.g. an MLflow tracker
    handed to the search, whose calls then count as `tracking`); attributes pass through."""

    def __init__(self, target, clock: Clock, section: str):
        self._target, self._clock, self._section = target, clock, section

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def timed(*args, **kwargs):
            with self._clock.section(self._section):
                return value(*args, **kwargs)

        return timed

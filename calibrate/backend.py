"""Thin adapters between calibration and the library: build the backbone, generate, evaluate, cost.

Calibration only ever calls `toprovar.pipeline.generate` (the one generation loop) through
`CalibrationBackend.generate`, in the equal chunks of `toprovar.batching` (whose `chunk_plan` the
objective reads too); everything model-specific stays in `toprovar`. The backbone's
config group (toprovar/conf/backbone/) is a plain dict: `name`, `weights` (local paths) and optionally
the generation settings of `toprovar.cli.GENERATION_KEYS` (the old names `cfg` and `tau` still work
for one release, with a warning).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from calibrate.timing import Clock
from toprovar.batching import BatchLimit, Chunk, resolve_batch_size, run_in_chunks
from toprovar.batching import chunk_plan as chunk_plan  # re-exported: calibrate.objective plans its chunks alike
from toprovar.cli import generation_settings
from toprovar.errors import UserError


def _file_fingerprint(path: Path, edge: int = 16 << 20) -> str:
    """sha256 of a file; files over 2*edge bytes hash size + first and last `edge` bytes (marked)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 2 * edge:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        digest.update(handle.read(edge))
        handle.seek(size - edge)
        digest.update(handle.read(edge))
    return f"sha256-edges:{digest.hexdigest()}"


def weights_fingerprint(path: str | None) -> str:
    """A stable hash of a weight file or folder (folder: hash of its files' names and hashes)."""
    if path is None:
        return "random-init"
    p = Path(path)
    if p.is_file():
        return _file_fingerprint(p)
    if p.is_dir():
        digest = hashlib.sha256()
        for file in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(f"{file.relative_to(p)}={_file_fingerprint(file)}\n".encode())
        return f"sha256-tree:{digest.hexdigest()}"
    return "missing"


@dataclass
class Generation:
    """The images and traces of one batched call (traces stay one per chunk).

    A chunk short of the common size runs padded with copies of its last prompt (same seed); the
    copies are dropped from `images` and the pruners' records, and their share of the chunk's
    FLOPs and time is left out of `flops` and `latency_ms` (every image of a chunk runs the same
    tokens, so the share is the count share)."""

    images: torch.Tensor  # (N, H, W, 3) uint8, the prompts' images (no padding)
    traces: list[Any]  # toprovar.trace.Trace per chunk (padded copies included)
    chunks: list[int]  # prompts per chunk
    pruners: list[Any] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # images per chunk call, padding included
    latency_ms: list[float] = field(default_factory=list)  # per chunk: steady-state time of the prompts' share

    @property
    def total_latency_ms(self) -> float:
        return float(sum(self.latency_ms))


@dataclass
class CalibrationBackend:
    """A built backbone plus the settings every calibration generation uses."""

    backbone: Any  # toprovar.models.registry.Backbone
    settings: dict[str, Any]  # generation keyword arguments
    weights: dict[str, str | None]  # resolved local paths (None: random init)
    limit: BatchLimit  # the batch size now, halved for the rest of the run after an out-of-memory error
    clock: Clock | None = None  # where generation time is counted (calibrate.timing)

    @property
    def batch_size(self) -> int:
        return self.limit.size

    @property
    def name(self) -> str:
        return self.backbone.spec.name

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def depth(self) -> int:
        return int(self.backbone.transformer.depth)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        policy: Any = None,
        pruner_factory: Callable[[], Any] | None = None,
        record_entropy: bool = False,
        desc: str | None = None,
        retime: int = 0,
        timing_only: bool = False,
    ) -> Generation:
        """Generate in equal chunks of at most `batch_size` (`toprovar.batching.run_in_chunks`: after a
        CUDA out-of-memory error the batch halves and the chunk is redone, nothing else repeats);
        `pruner_factory` gives a fresh pruner per call. Each chunk's latency is its trace's time (CUDA
        events: scale loop + decode); a call that captured CUDA graphs (a plan new to the static
        buffers) has that capture in its time, so the chunk runs again, up to `retime` times, until a
        call captures nothing, and that call's time counts (images and traces stay the first call's:
        same seeds). `timing_only`: a run for its time alone (warm-up, more timed passes), counted as such."""

        def chunk_call(chunk: Chunk) -> tuple[Any, Any, float]:
            texts, chunk_seeds = [prompts[i] for i in chunk.padded], [seeds[i] for i in chunk.padded]
            pruner = pruner_factory() if pruner_factory is not None else None
            result = self._call(
                texts,
                chunk_seeds,
                pruner if pruner is not None else policy,
                record_entropy,
                real=0 if timing_only else len(chunk),
            )
            steady = result
            for _ in range(retime):
                if not steady.runtime.get("captures"):
                    break
                again = pruner_factory() if pruner_factory is not None else policy
                steady = self._call(texts, chunk_seeds, again, record_entropy, real=0)
            return result, pruner, steady.trace.total_ms * len(chunk) / chunk.size

        from toprovar.fast import release_fast_runtime

        bar = (
            None if desc is None else tqdm(total=len(prompts), desc=desc, unit="image", leave=False, dynamic_ncols=True)
        )
        try:
            done = run_in_chunks(
                len(prompts),
                self.limit,
                chunk_call,
                release=lambda: release_fast_runtime(self.backbone),
                progress=None if bar is None else bar.update,
            )
        finally:
            if bar is not None:
                bar.close()
        return Generation(
            torch.cat([result.images[: len(chunk)] for chunk, (result, _, _) in done]),
            [result.trace for _, (result, _, _) in done],
            [len(chunk) for chunk, _ in done],
            [pruner for _, (_, pruner, _) in done],
            [chunk.size for chunk, _ in done],
            [latency for _, (_, _, latency) in done],
        )

    def _call(self, prompts: list[str], seeds: list[int], policy: Any, record_entropy: bool, real: int):
        """One `toprovar.pipeline.generate` call, counted on the clock: `real` of its images are the
        prompts' (the rest padding); `real=0`: a run for its time only."""
        from toprovar.pipeline import generate

        start = time.perf_counter()
        result = generate(self.backbone, prompts, seeds, policy=policy, record_entropy=record_entropy, **self.settings)
        if self.clock is not None:
            self.clock.seconds["generation"] += time.perf_counter() - start
            self.clock.count(
                images=real,
                padded_images=len(prompts) - real if real else 0,
                timing_only_images=0 if real else len(prompts),
                generate_calls=1,
                gpu_ms=result.trace.total_ms,
                text_ms=result.trace.text_encode_ms,
            )
        return result

    def fingerprint(self) -> dict[str, str]:
        return {part: weights_fingerprint(path) for part, path in self.weights.items()}


def load_backend(
    backbone_cfg: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int | str,
    clock: Clock | None = None,
) -> CalibrationBackend:
    """Build the backbone named by the config group; one-line errors for unknown names / missing files
    and for a batch that cannot fit the device, all before any weights load. `batch_size`: a number
    or `auto` (`toprovar.batching.resolve_batch_size`: the backbone's memory model on CUDA, its
    `memory.cpu_batch` on CPU)."""
    import toprovar.models.registry as registry

    name = str(backbone_cfg["name"])
    spec = registry.get_backbone(name)
    weights = dict(backbone_cfg.get("weights") or {})
    for part, path in weights.items():
        if path not in (None, "") and not os.path.exists(str(path)):
            raise UserError(
                f"backbone '{name}': {part} weights not found at {path}; set backbone.weights.{part}=/local/path"
            )
    paths = spec.weights.merged(weights)
    settings = generation_settings(backbone_cfg)
    batch = resolve_batch_size(
        batch_size, backbone_cfg, spec, device, pixels=settings.get("pixels"), h_div_w=settings.get("h_div_w")
    )
    built = registry.build_backbone(spec, weights, device=device, dtype=dtype)
    resolved = {"transformer": paths.transformer, "vae": paths.vae, "text_encoder": paths.text_encoder}
    if spec.random_init:
        resolved = {k: (v if v is not None and os.path.exists(v) else None) for k, v in resolved.items()}
    return CalibrationBackend(built, settings, resolved, BatchLimit(batch, "calibrate"), clock)

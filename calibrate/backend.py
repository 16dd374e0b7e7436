"""Thin adapters between calibration and the library: build the backbone, generate, evaluate, cost.

Calibration only ever calls `toprovar.pipeline.generate` (the one generation loop) through
`CalibrationBackend.generate`; everything model-specific stays in `toprovar`. The backbone's
config group (toprovar/conf/backbone/) is a plain dict: `name`, `weights` (local paths) and optionally
the generation settings of `toprovar.cli.GENERATION_KEYS` (the old names `cfg` and `tau` still work
for one release, with a warning).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

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
    """The images and traces of one batched call (traces stay one per chunk)."""

    images: torch.Tensor          # (N, H, W, 3) uint8
    traces: list[Any]             # toprovar.trace.Trace per chunk
    chunks: list[int]             # images per chunk
    pruners: list[Any] = field(default_factory=list)


@dataclass
class CalibrationBackend:
    """A built backbone plus the settings every calibration generation uses."""

    backbone: Any                                  # toprovar.models.registry.Backbone
    settings: dict[str, Any]                       # generation keyword arguments
    weights: dict[str, str | None]                 # resolved local paths (None: random init)
    batch_size: int = 8

    @property
    def name(self) -> str:
        return self.backbone.spec.name

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def depth(self) -> int:
        return int(self.backbone.transformer.depth)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, policy: Any = None,
                 pruner_factory: Callable[[], Any] | None = None, record_entropy: bool = False,
                 desc: str | None = None) -> Generation:
        """Generate in chunks of `batch_size`; `pruner_factory` gives a fresh pruner per chunk."""
        from toprovar.pipeline import generate

        images, traces, chunks, pruners = [], [], [], []
        starts = range(0, len(prompts), self.batch_size)
        if desc is not None:
            starts = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
        for start in starts:
            stop = start + self.batch_size
            pruner = pruner_factory() if pruner_factory is not None else None
            result = generate(self.backbone, list(prompts[start:stop]), list(seeds[start:stop]),
                              policy=pruner if pruner is not None else policy,
                              record_entropy=record_entropy, **self.settings)
            images.append(result.images)
            traces.append(result.trace)
            chunks.append(result.images.shape[0])
            pruners.append(pruner)
        return Generation(torch.cat(images), traces, chunks, pruners)

    def fingerprint(self) -> dict[str, str]:
        return {part: weights_fingerprint(path) for part, path in self.weights.items()}


def load_backend(backbone_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None,
                 batch_size: int) -> CalibrationBackend:
    """Build the backbone named by the config group; one-line errors for unknown names / missing files."""
    import toprovar.models.registry as registry

    name = str(backbone_cfg["name"])
    spec = registry.get_backbone(name)
    weights = dict(backbone_cfg.get("weights") or {})
    for part, path in weights.items():
        if path not in (None, "") and not os.path.exists(str(path)):
            raise UserError(f"backbone '{name}': {part} weights not found at {path}; "
                            f"set backbone.weights.{part}=/local/path")
    paths = spec.weights.merged(weights)
    built = registry.build_backbone(spec, weights, device=device, dtype=dtype)
    settings = generation_settings(backbone_cfg)
    resolved = {"transformer": paths.transformer, "vae": paths.vae, "text_encoder": paths.text_encoder}
    if spec.random_init:
        resolved = {k: (v if v is not None and os.path.exists(v) else None) for k, v in resolved.items()}
    return CalibrationBackend(built, settings, resolved, batch_size)

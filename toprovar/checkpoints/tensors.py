"""Seeded tensors by name, and the two file formats the official releases use.

A `TensorSpec` says what one tensor of a checkpoint is (name, shape, dtype) and how its values are
made: `mean + std * N(0, 1)`, or fixed `values`. Each tensor draws from its own generator, seeded by
(seed, part, name) alone, so a file is reproducible byte for byte and no tensor depends on which
others were drawn before it (tensors can be drawn in any order, in parallel, or alone).

Formats: `write_torch_file` (one `torch.save` file, the state dict at the top level or under one
key) and `write_safetensors_folder` (Hugging Face layout: `model.safetensors`, or shards
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`; one shard in memory at a time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# torch's CPU normal_ fills one tensor on one thread: draw several tensors at once instead.
_DRAW_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint: its name, shape, stored dtype and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    std: float = 0.0  # values: mean + std * N(0, 1); std 0 gives the constant `mean`
    mean: float = 0.0
    values: tuple[float, ...] | None = None  # fixed contents (buffers the release stores, e.g. bit masks)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def key_seed(seed: int, part: str, name: str) -> int:
    """The generator seed of one tensor: a hash of (seed, part, name), 63 bits."""
    digest = hashlib.sha256(f"{seed}/{part}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw(spec: TensorSpec, seed: int, part: str) -> Tensor:
    """The values of one tensor (CPU, float32 draws cast to the stored dtype)."""
    if spec.values is not None:
        return torch.tensor(spec.values, dtype=spec.dtype).reshape(spec.shape)
    if spec.std == 0:
        return torch.full(spec.shape, spec.mean, dtype=spec.dtype)
    gen = torch.Generator().manual_seed(key_seed(seed, part, spec.name))
    return torch.randn(spec.shape, generator=gen).mul_(spec.std).add_(spec.mean).to(spec.dtype)


def draw_all(
    specs: Sequence[TensorSpec], seed: int, part: str, advance: Callable[[int], object] | None = None
) -> dict[str, Tensor]:
    """Every tensor of `specs`, in order; `advance(nbytes)` is called as each one is ready."""
    out: dict[str, Tensor] = {}
    with ThreadPoolExecutor(_DRAW_THREADS) as pool:
        for spec, value in zip(specs, pool.map(lambda s: draw(s, seed, part), specs)):
            out[spec.name] = value
            if advance is not None:
                advance(spec.nbytes)
    return out


def write_torch_file(
    path: Path,
    specs: Sequence[TensorSpec],
    seed: int,
    part: str,
    *,
    wrapper: str | None = None,
    advance: Callable[[int], object] | None = None,
) -> None:
    """One `torch.save` file holding the state dict (under `wrapper` if given), as `torch.load` reads it."""
    state = draw_all(specs, seed, part, advance)
    torch.save({wrapper: state} if wrapper else state, path)


def split_evenly(specs: Sequence[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """`specs` in order, cut into `shards` runs of about equal bytes (a tensor goes where it starts)."""
    total = sum(s.nbytes for s in specs)
    runs: list[list[TensorSpec]] = [[] for _ in range(shards)]
    start = 0
    for spec in specs:
        runs[min(shards - 1, start * shards // max(total, 1))].append(spec)
        start += spec.nbytes
    if not all(runs):
        raise ValueError(f"{len(specs)} tensors do not fill {shards} shards")
    return runs


def write_safetensors_folder(
    folder: Path,
    specs: Sequence[TensorSpec],
    seed: int,
    part: str,
    *,
    shards: int = 1,
    advance: Callable[[int], object] | None = None,
) -> None:
    """Hugging Face weights layout in `folder`: one `model.safetensors`, or `shards` files and an index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(draw_all(specs, seed, part, advance), folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for k, run in enumerate(split_evenly(specs, shards), start=1):
        name = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(draw_all(run, seed, part, advance), folder / name, metadata={"format": "pt"})
        weight_map.update({s.name: name for s in run})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

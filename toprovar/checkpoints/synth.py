"""Random-weight checkpoints in the official release layout of a backbone.

`release_plan(backbone, preset)` lists the files (names, formats, every tensor's name, shape and
dtype) without allocating anything; `synthesize(plan, out, seed)` writes them. File and folder
names are the registry's default weight paths of the backbone (`weights/<name>`), so the loaders
read these files exactly as they read the real ones: nothing in them says they are synthetic.

What each release stores (the reference manifests give names and shapes only; the rest is read off
the official code):
  * infinity-2b: `infinity_2b_reg.pth`, one `torch.save` of the flat state dict, float32 (the
    trainer's FSDP full state dict without mixed precision, re-saved by `save_slim_model`);
  * infinity-8b: `infinity_8b_weights/`, 4 safetensors shards `model-0000k-of-00004.safetensors` +
    `model.safetensors.index.json` (read by transformers' `load_sharded_checkpoint`), bfloat16
    (assumed: 4 shards of at most 5 GB as huggingface_hub writes them; not confirmed by a manifest);
  * VAE `.pth`: `{"vae": state_dict}` (official `vae_model` reads `state_dict["vae"]`), float32;
  * `flan-t5-xl/`: a Hugging Face folder (see `toprovar.checkpoints.flan_t5`).
`preset=small` writes the same layout with small shapes (`Release.small`) so tests can run the real
loaders on a CPU; a checkout's `tests/backbones.py` registers the backbone that reads them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from toprovar.checkpoints import flan_t5
from toprovar.checkpoints.infinity import transformer_tensors, vae_tensors
from toprovar.checkpoints.tensors import TensorSpec, write_safetensors_folder, write_torch_file
from toprovar.errors import UserError
from toprovar.models.registry import WeightPaths, get_backbone
from toprovar.models.transformer import TransformerConfig
from toprovar.models.vae import VAE_PRESETS

PRESETS = ("full", "small")
STAGING = ".synth-partial"  # unfinished parts are written here, then moved into place


@dataclass(frozen=True)
class SmallShapes:
    """The shapes `preset=small` writes a release at, and the name of the backbone that reads them
    (registered only from a checkout, by tests/backbones.py, which builds it from these shapes)."""

    backbone: str
    transformer: TransformerConfig  # two blocks, in the official `block_chunks.c.module.j.` naming
    vae: Any  # a VAEConfig


def _small_transformer(codebook_dim: int, patchify: bool) -> TransformerConfig:
    # Same semantics as the official configs (cosine attention, RoPE, AdaLN, bitwise head), tiny widths.
    return TransformerConfig(
        depth=2,
        embed_dim=64,
        num_heads=2,
        codebook_dim=codebook_dim,
        apply_spatial_patchify=patchify,
        text_channels=32,
        text_maxlen=16,
        pool_head_dim=16,
        block_chunks=2,
    )


@dataclass(frozen=True)
class Release:
    """How the official release of one backbone stores its transformer."""

    transformer_dtype: torch.dtype
    transformer_shards: int  # 1: one torch .pth file; n > 1: a folder of n safetensors shards + index
    small: SmallShapes  # what preset=small writes in this layout


RELEASES = {
    "infinity-2b": Release(
        torch.float32, 1, small=SmallShapes("test-small-t5", _small_transformer(6, False), VAE_PRESETS["test"])
    ),
    "infinity-8b": Release(
        torch.bfloat16,
        4,
        small=SmallShapes(
            "test-small-patchify-t5",
            _small_transformer(24, True),
            replace(VAE_PRESETS["test"], apply_spatial_patchify=True),
        ),
    ),
}


@dataclass(frozen=True)
class Part:
    """One file or folder of a release."""

    role: str  # transformer | vae | text_encoder (the WeightPaths field that points at it)
    name: str  # file or folder name
    tensors: tuple[TensorSpec, ...]
    format: str  # torch (one .pth file) | safetensors (a Hugging Face weights folder)
    shards: int = 1
    wrapper: str | None = None  # torch files: the key the state dict sits under
    extras: Callable[[Path], None] | None = None  # writes the other files of a folder (config, tokenizer)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ReleasePlan:
    backbone: str  # the registered backbone that loads these files
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def weights(self, out: Path) -> WeightPaths:
        return WeightPaths(**{p.role: str(out / p.name) for p in self.parts})


def check_release(backbone: str, preset: str) -> None:
    """A one-line UserError unless `backbone` has a known release layout and `preset` exists."""
    if backbone not in RELEASES:
        raise UserError(f"backbone={backbone!r} has no official release layout; choose one of {', '.join(RELEASES)}")
    if preset not in PRESETS:
        raise UserError(f"preset={preset!r}; choose one of {', '.join(PRESETS)}")


def release_plan(backbone: str, preset: str = "full") -> ReleasePlan:
    """The files of `backbone`'s official release; `preset=small`: the same files at test size."""
    check_release(backbone, preset)
    release, official = RELEASES[backbone], get_backbone(backbone)
    if preset == "small":
        small = release.small
        spec = replace(official, name=small.backbone, transformer=small.transformer, vae=small.vae)
    else:
        spec = official
    names = {role: Path(getattr(official.weights, role)).name for role in ("transformer", "vae", "text_encoder")}
    sharded = release.transformer_shards > 1
    parts = [
        Part(
            "transformer",
            names["transformer"],
            tuple(transformer_tensors(spec.transformer, release.transformer_dtype)),
            "safetensors" if sharded else "torch",
            shards=release.transformer_shards,
        ),
        Part("vae", names["vae"], tuple(vae_tensors(spec.vae)), "torch", wrapper="vae"),
    ]
    if spec.text_encoder == "t5":
        config = flan_t5.t5_config_values(spec.transformer.text_channels)
        parts.append(
            Part(
                "text_encoder",
                names["text_encoder"],
                tuple(flan_t5.t5_tensors(config)),
                "safetensors",
                extras=lambda folder: flan_t5.write_config_and_tokenizer(folder, config),
            )
        )
    return ReleasePlan(spec.name, tuple(parts))


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.1f} MB"


def check_output_folder(out: Path, nbytes: int = 0) -> None:
    """A one-line UserError unless `out` is (or can be made) a writable folder with room for `nbytes`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(f"out={out}: cannot write there ({err.strerror or type(err).__name__})") from None
    free = shutil.disk_usage(out).free
    if free < nbytes:
        raise UserError(f"out={out}: the files need {size_text(nbytes)}, only {size_text(free)} free")


def _write_part(part: Part, path: Path, seed: int, advance: Callable[[int], object]) -> None:
    if part.format == "torch":
        write_torch_file(path, part.tensors, seed, part.role, wrapper=part.wrapper, advance=advance)
    else:
        write_safetensors_folder(path, part.tensors, seed, part.role, shards=part.shards, advance=advance)
        if part.extras is not None:
            part.extras(path)


def _move_into_place(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def synthesize(plan: ReleasePlan, out: str | Path, seed: int = 0, progress: bool = True) -> WeightPaths:
    """Write every part of `plan` into `out` (a part appears only once complete); returns its paths."""
    from tqdm.auto import tqdm

    out = Path(out).expanduser().resolve()
    check_output_folder(out, plan.nbytes)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir()
    with tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
        for part in plan.parts:
            bar.set_description(part.name)
            _write_part(part, staging / part.name, seed, bar.update)
            _move_into_place(staging / part.name, out / part.name)
    staging.rmdir()
    return plan.weights(out)

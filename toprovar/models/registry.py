"""Backbone registry: a name -> architecture, VAE, text encoder, default schedule and weights.

`get_backbone(name)` returns a `BackboneSpec`; `build_backbone(spec, weights, device, dtype)` loads
it into a `Backbone` ready for `toprovar.pipeline.generate`. Other packages add backbones with
`register_backbone(spec)` (e.g. the embedded `tiny` one) and text encoder kinds with
`register_text_encoder(kind, factory)`; modules named in $TOPROVAR_EXTRA_BACKBONES are imported
with the embedded ones (how a checkout's tests add their small random-weight backbones).

Weights come from local paths only; the defaults below are where the official files usually
sit (`weights/...`, as in the official scripts) and every one can be overridden. A missing file,
an unreadable one or a key/shape mismatch is a one-line `UserError` naming the file and the key.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from toprovar.errors import UserError
from toprovar.extras import extra_backbone_modules, missing_module
from toprovar.fast.runtime import FastRuntime
from toprovar.models.checkpoint import load_into
from toprovar.models.transformer import (
    CHECKPOINT_IGNORE,
    TRANSFORMER_PRESETS,
    InfinityTransformer,
    TransformerConfig,
    checkpoint_rename,
    random_state_dict,
)
from toprovar.schedules import INFINITY_SCHEDULES, ScheduleFamily


@dataclass(frozen=True)
class WeightPaths:
    """Local paths of a backbone's weights (None: not given)."""

    transformer: str | None = None  # .pth file or folder of shards
    vae: str | None = None  # .pth file
    text_encoder: str | None = None  # folder (e.g. a Hugging Face Flan-T5 snapshot)

    def merged(self, overrides: Mapping[str, Any] | WeightPaths | None) -> WeightPaths:
        """These paths with the non-empty entries of `overrides` in their place."""
        if overrides is None:
            return self
        if isinstance(overrides, WeightPaths):
            overrides = {f.name: getattr(overrides, f.name) for f in fields(WeightPaths)}
        known = {f.name for f in fields(WeightPaths)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown weight entry '{unknown[0]}'; known entries: {', '.join(sorted(known))}")
        return replace(self, **{k: str(v) for k, v in overrides.items() if v not in (None, "")})


@dataclass(frozen=True)
class PromptSource:
    """A backbone's built-in prompts (e.g. tiny's captioned procedural scenes), named as configs name
    it (`prompts.source` of `python -m calibrate`): `sample(count, seed)` -> (captions, specs), where
    a spec is what the backbone's evaluator reads for its prompt (the same `count` and `seed` always
    give the same prompts)."""

    name: str
    sample: Callable[[int, int], tuple[list[str], list[Any]]]


# (images (N, H, W, 3) uint8, prompts or specs) -> one (N,) float array in [0, 1] per name of
# toprovar.metrics.GENEVAL_SCORES, in that order.
GenevalFunction = Callable[[torch.Tensor, Any], tuple[Any, ...]]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that names a backbone and what is particular to it; plain values, no Hydra.
    Generic code asks the spec (`prompt_source`, `geneval`), never a backbone's name."""

    name: str
    transformer: TransformerConfig
    vae: Any  # a preset name of toprovar.models.vae.VAE_PRESETS or a VAEConfig
    text_encoder: str  # text encoder kind: 't5' or one added with register_text_encoder
    weights: WeightPaths = field(default_factory=WeightPaths)
    pixels: str = "1M"  # default pixel budget of the scale schedule
    guidance_scale: float = 3.0  # default classifier-free guidance scale (official inference: 3)
    temperature: float = 1.0  # default sampling temperature
    random_init: bool = False  # test backbones: seeded random weights when no path is given
    schedules: ScheduleFamily = INFINITY_SCHEDULES  # token grids per aspect ratio and pixel budget
    prompt_source: PromptSource | None = None  # built-in prompts (compare's, calibration's), if any
    geneval: GenevalFunction | None = None  # automatic prompt evaluator (toprovar.metrics.geneval_scorer)


@dataclass
class Backbone:
    """A built backbone: modules on one device, ready for `generate`."""

    spec: BackboneSpec
    transformer: InfinityTransformer
    vae: nn.Module
    text_encoder: Any
    device: torch.device
    dtype: torch.dtype  # compute dtype (bf16 autocast on CUDA, float32 on CPU)
    # The fast path's static buffers, CUDA graphs and planned units for this backbone.
    fast_runtime: FastRuntime = field(default_factory=FastRuntime, repr=False, compare=False)


_BACKBONES: dict[str, BackboneSpec] = {}
_TEXT_ENCODERS: dict[str, Callable[..., Any]] = {}


def register_backbone(spec: BackboneSpec, *, replace_existing: bool = False) -> BackboneSpec:
    if spec.name in _BACKBONES and not replace_existing:
        raise ValueError(f"backbone '{spec.name}' is already registered")
    _BACKBONES[spec.name] = spec
    return spec


def register_text_encoder(kind: str, factory: Callable[..., Any]) -> None:
    """`factory(path: str | None, device: torch.device, dtype: torch.dtype)` -> text encoder."""
    _TEXT_ENCODERS[kind] = factory


# Packages that register backbones of their own on import (the embedded `tiny` one).
_EMBEDDED_PACKAGES = ("toprovar.tiny",)


def _import_embedded() -> None:
    for package in (*_EMBEDDED_PACKAGES, *extra_backbone_modules()):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as err:
            if err.name is None or not (package == err.name or package.startswith(f"{err.name}.")):
                raise  # the module exists and one of its own imports is missing: a real bug
            raise missing_module(package) from None


def backbone_names() -> list[str]:
    _import_embedded()
    return sorted(_BACKBONES)


def prompt_sources() -> dict[str, PromptSource]:
    """Every registered backbone's built-in prompt source, by its name."""
    _import_embedded()
    return {spec.prompt_source.name: spec.prompt_source for spec in _BACKBONES.values() if spec.prompt_source}


def get_backbone(name: str | BackboneSpec) -> BackboneSpec:
    if isinstance(name, BackboneSpec):
        return name
    _import_embedded()
    if name not in _BACKBONES:
        raise UserError(f"unknown backbone '{name}'; known backbones: {', '.join(backbone_names())}")
    return _BACKBONES[name]


# -- building --------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """A user's device setting (auto | cpu | cuda | cuda:N) -> torch.device; one-line errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but this machine has no CUDA GPU; use device=cpu")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | None:
    """A user's dtype setting (auto | float32 | bfloat16 | float16) -> the dtype of the transformer
    blocks and the VAE; None for auto (`default_dtype` of the device). One-line errors."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _missing(spec: BackboneSpec, part: str) -> UserError:
    return UserError(f"backbone '{spec.name}' has no {part} weights; set backbone.weights.{part}=/local/path")


def build_transformer(
    spec: BackboneSpec, path: str | None, device: torch.device, dtype: torch.dtype
) -> InfinityTransformer:
    """Load the transformer strictly (official checkpoint names, rename map for block chunks).

    Blocks take `dtype` (the official inference casts them to bf16); the text, embedding and
    head layers stay float32.
    """
    with torch.device("meta"):
        model = InfinityTransformer(spec.transformer)
    if path is not None:
        load_into(model, path, rename=checkpoint_rename(spec.transformer), ignore=CHECKPOINT_IGNORE)
    elif spec.random_init:
        model.load_state_dict(random_state_dict(spec.transformer, seed=0), strict=True, assign=True)
    else:
        raise _missing(spec, "transformer")
    model = model.to(device=device, dtype=torch.float32)
    model.blocks.to(dtype=dtype)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_vae_for(spec: BackboneSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from toprovar.models import vae as vae_lib  # lazy: keeps the registry importable on its own

    if path is not None:
        return vae_lib.load_vae(path, spec.vae, device=device, dtype=dtype)
    if not spec.random_init:
        raise _missing(spec, "vae")
    with _seeded(0):
        model = vae_lib.build_vae(spec.vae, device="cpu")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_text_encoder(spec: BackboneSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    if spec.text_encoder in _TEXT_ENCODERS:
        return _TEXT_ENCODERS[spec.text_encoder](path, device, dtype)
    if spec.text_encoder == "t5":
        if path is None:
            raise _missing(spec, "text_encoder")
        from toprovar.models.text_encoder import T5TextEncoder  # lazy: pulls in transformers

        # dtype left to the encoder: float16 on CUDA as official Infinity, float32 on CPU.
        return T5TextEncoder.from_folder(path, max_length=spec.transformer.text_maxlen, device=device)
    raise UserError(
        f"backbone '{spec.name}' names text encoder kind '{spec.text_encoder}', which is not "
        f"registered; known kinds: {', '.join(['t5', *sorted(_TEXT_ENCODERS)])}"
    )


def build_backbone(
    spec: str | BackboneSpec,
    weights: Mapping[str, Any] | WeightPaths | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Load a backbone's transformer, VAE and text encoder from local paths onto `device`."""
    spec = get_backbone(spec)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    paths = spec.weights.merged(weights)
    transformer = build_transformer(spec, paths.transformer, device, dtype)
    vae = build_vae_for(spec, paths.vae, device, dtype)
    token_dim = getattr(vae, "token_dim", spec.transformer.codebook_dim)
    if token_dim != spec.transformer.codebook_dim:
        raise ValueError(
            f"backbone '{spec.name}': VAE gives {token_dim} bits per token, transformer "
            f"expects {spec.transformer.codebook_dim}"
        )
    text_encoder = build_text_encoder(spec, paths.text_encoder, device, dtype)
    return Backbone(spec, transformer, vae, text_encoder, device, dtype)


# -- the official backbones ------------------------------------------------------------------------


def _official_backbone(name: str, vae: str, transformer_file: str, vae_file: str, temperature: float) -> BackboneSpec:
    """An official release: its transformer preset, Flan-T5-XL text, 1M pixels, guidance 3 (the
    official notebooks), files under `weights/` by their release names."""
    return BackboneSpec(
        name=name,
        transformer=TRANSFORMER_PRESETS[name],
        vae=vae,
        text_encoder="t5",
        weights=WeightPaths(
            transformer=f"weights/{transformer_file}", vae=f"weights/{vae_file}", text_encoder="weights/flan-t5-xl"
        ),
        pixels="1M",
        guidance_scale=3.0,
        temperature=temperature,
    )


# The official notebooks: 2B at cfg 3, tau 0.5; 8B at cfg 3, tau 1.
register_backbone(_official_backbone("infinity-2b", "d32", "infinity_2b_reg.pth", "infinity_vae_d32_reg.pth", 0.5))
register_backbone(
    _official_backbone("infinity-8b", "d14_patchify", "infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth", 1.0)
)

"""The dataclass schema of every toprovar command, registered with Hydra's ConfigStore.

Each schema names its command's keys and their types, and nothing else: the defaults live only in
the command's YAML (toprovar/conf/<command>.yaml), which lists `<command>_schema` first in its
defaults list, so Hydra types every value (and refuses unknown keys) while it composes, before the
app runs. No field here has a default; a key the YAML lacks is a composition error.
`python -m calibrate` has its own schema beside its app (calibrate.config).
Importing this module does not import torch (the override check stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A batch setting is `auto` or a positive integer; OmegaConf has no such union, so it is `Any` here and
# `toprovar.batching.batch_setting` checks it.


@dataclass
class GenerationConfig:
    """What `generate` and `compare` share: the backbone, prompts, generation settings, device, batch."""

    backbone: dict[str, Any]  # the backbone config group (toprovar/conf/backbone/)
    text_prompts: Any  # a list of prompts (alias `prompts=`); compare: null for its built-in prompts
    seeds: Any  # one integer per prompt, or null: 0, 1, 2, ...
    guidance_scale: Any  # one number or one per scale; null: the backbone's
    temperature: Any  # one number or one per scale; null: the backbone's
    pixels: str | None
    h_div_w: float | None
    top_k: int | None
    top_p: float | None
    kv_policy: str | None
    allow_other_backbone: bool
    device: str
    dtype: str
    batch_size: Any  # auto | a positive integer (toprovar.batching.batch_setting)
    out_dir: str | None


@dataclass
class GenerateConfig(GenerationConfig):
    """`python -m toprovar generate` (toprovar/conf/generate.yaml)."""

    policy: str | None


@dataclass
class CompareConfig(GenerationConfig):
    """`python -m toprovar compare` (toprovar/conf/compare.yaml)."""

    methods: Any  # a list of method entries (toprovar.compare), or null: all the built-ins
    n_prompts: int  # built-in prompts when text_prompts is null
    prompt_seed: int
    warmup: int


@dataclass
class VAETrainConfig:
    steps: int
    batch: int
    lr: float
    warmup: int
    edge_weight: float  # L1 of image gradients: keeps shape edges and stripes sharp


@dataclass
class TransformerTrainConfig:
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    cfg_drop: float  # share of captions replaced by cfg_uncond
    bitflip_strength: float  # max flip rate of bitwise self-correction
    scale_weight_power: float  # token weight ∝ tokens_of_its_scale^-power (coarse scales count more)
    ema: float
    compile: bool  # torch.compile the teacher-forced forward + loss (CUDA; falls back to eager)
    # Data recipe. kind_weights: relative frequency of each caption kind (missing: 1; empty: uniform).
    # relation_contrast: every `position` scene is followed in its batch by its mirror image with the
    # noun phrases or the relation word swapped (scenes.relation_contrast), so the pair differs only in
    # what decides the layout.
    kind_weights: dict[str, float]
    relation_contrast: bool


@dataclass
class EvalConfig:
    prompts: int  # held-out prompts for geneval-lite
    psnr_images: int
    guidance_scales: list[float]
    batch: int


@dataclass
class TrainConfig:
    """`python -m toprovar.tiny.train` (toprovar/conf/train_tiny.yaml)."""

    stage: str
    seed: int
    device: str
    out_dir: str | None
    vae_weights: str | None  # stage=transformer: a trained VAE (default: this run's)
    init_from: str | None  # stage=transformer: start from exported weights (a folder) to train on
    export_to: str | None
    max_minutes: float | None  # checkpoint and stop after this long (re-run to resume)
    checkpoint_every_s: float
    vae: VAETrainConfig
    transformer: TransformerTrainConfig
    eval: EvalConfig


def typed_config(cfg: Any, schema: type) -> Any:
    """A composed config (or a dict of every key) as an instance of `schema`: a key the schema lacks
    (e.g. added with `+key=...`), a missing one or a wrong type is a one-line UserError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from toprovar.errors import UserError

    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        # merged as plain values: a composed config carries its schema already, and OmegaConf's
        # to_object would keep a key added with `+key=` as an extra attribute
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as err:
        raise UserError("bad config: " + " ".join(str(err).split("\n")[0].split())) from None


# command config name -> its schema; the YAML's defaults list names `<config name>_schema`
SCHEMAS: dict[str, type] = {"generate": GenerateConfig, "compare": CompareConfig, "train_tiny": TrainConfig}


def schema_name(config_name: str) -> str:
    return f"{config_name}_schema"


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore as `<config name>_schema` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for config_name, schema in SCHEMAS.items():
        store.store(name=schema_name(config_name), node=schema)

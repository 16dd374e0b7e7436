"""Typed view of the Hydra config: one dataclass per config group, checked once at start-up.

The Hydra app hands a DictConfig to `parse_config`; everything below it works with these frozen
dataclasses, so a typo or an out-of-range value is reported once, in one line, before any work.
The backbone group belongs to the model registry and is passed through as a plain dict.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from calibrate.knobs import check_space
from toprovar.errors import UserError

STAGES = ("presample", "search", "select", "export", "evaluate")
SAMPLERS = ("tpe", "nsga2", "gp", "random")  # calibrate.search builds each
OBJECTIVES = ("auto", "model", "flops", "latency")
COST_MODEL_SOURCES = ("auto", "fit")  # calibrate.cost_model: the backbone's stored coefficients, or fitted

# No field has a default: toprovar/conf/ (the YAML) is the one source of default values, and a key it
# lacks is an error naming the key.


@dataclass
class PromptsConfig:
    source: str  # tiny_scenes | list
    seed: int
    presample: int
    search: int
    validate: int
    file: str | None  # one prompt a line; replaces `items`
    items: list[str]


@dataclass
class ConstraintsConfig:
    min_ssim: float
    max_geneval_drop: float
    max_clip_drop: float  # CLIPScore points (100 · cosine); applies with quality.clip


@dataclass
class LatencyConfig:
    warmup: int
    repeats: int


@dataclass
class CostModelConfig:
    """search.cost_model: the predicted wall clock the CPU search maximizes (calibrate.cost_model)."""

    source: str  # auto: the backbone's stored coefficients (backbone.cost_model) if any, else fit | fit
    probes: int  # random policies of the space the pre-sampling times to fit the model


@dataclass
class AcceptanceConfig:
    """search.acceptance: held-out validation as a one-sided bound per metric, decided sequentially
    (calibrate.acceptance). The budget is `prompts.validate`. No defaults: toprovar/conf/search/default.yaml."""

    confidence: float  # 1 - alpha of every bound, over all looks together
    score: str  # geneval-lite score acceptance bounds: share | binary (quality.GENEVAL_SCORES)
    max_geneval_drop: float  # margin on the mean paired geneval-lite drop
    min_ssim: float  # floor on the mean SSIM against the unpruned images
    max_clip_drop: float  # margin on the mean paired CLIPScore drop (with quality.clip)
    batch: int  # held-out prompts per look
    futility: bool  # stop a validation early once its bound cannot be met within the budget


@dataclass
class SearchConfig:
    n_trials: int
    sampler: str
    objective: str
    warm_start: bool
    timeout_s: float | None
    constraints: ConstraintsConfig
    space: dict[str, Any]  # knob name -> range or choices; calibrate.knobs checks it
    latency: LatencyConfig
    cost_model: CostModelConfig
    validate_candidates: int
    target_speedup: float | None  # the first validated trial: the slowest of the front reaching it
    acceptance: AcceptanceConfig
    workers: int  # search processes sharing the study: one per GPU, or sharing the CPU


@dataclass
class QualityConfig:
    """quality: evaluators beyond SSIM (geneval-lite is the tiny backbone's own)."""

    clip: str | None  # local CLIP model folder for CLIPScore (calibrate.quality); null: off


@dataclass
class TrackingConfig:
    enabled: bool
    uri: str | None
    experiment: str
    probe_timeout_s: float
    log_images: bool


@dataclass
class StorageConfig:
    url: str | None
    heartbeat_interval_s: int
    grace_period_s: int


@dataclass
class CalibrationConfig:
    backbone: dict[str, Any]
    prompts: PromptsConfig
    search: SearchConfig
    quality: QualityConfig
    tracking: TrackingConfig
    storage: StorageConfig
    study_name: str
    seed: int
    device: str
    dtype: str
    export_to: str | None
    stages: tuple[str, ...]
    batch_size: int | str  # a positive integer or auto (toprovar.batching.batch_setting)
    evaluate: tuple[str, ...]  # policies (names or YAML paths) the evaluate stage measures

    @property
    def joins_only(self) -> bool:
        """`stages=[search]`: a worker joining a calibration another process pre-samples and ends."""
        return set(self.stages) == {"search"}

    @property
    def backbone_name(self) -> str:
        return str(self.backbone.get("name", "unknown"))


SCHEMA_NAME = "calibrate_schema"  # CalibrationConfig's name in Hydra's ConfigStore


def register_schema() -> str:
    """Register `CalibrationConfig` (every field typed, none with a default: the YAML gives them) with
    Hydra's ConfigStore as `SCHEMA_NAME`; returns the name. `parse_config` checks a composed config
    against the same dataclasses, group by group, with one-line errors."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=CalibrationConfig)
    return SCHEMA_NAME


def _typed(schema: type, node: Any, group: str) -> Any:
    """Merge a config node onto its dataclass schema: unknown keys and wrong types are errors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        where = f"{group}.{err.full_key}" if getattr(err, "full_key", None) else group
        raise UserError(f"config {where} has no value; set it in toprovar/conf/ or override {where}=...") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"{group}.{key}" if key else group
        raise UserError(f"bad config {where}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _validate(cfg: CalibrationConfig) -> None:
    s = cfg.search
    if s.sampler not in SAMPLERS:
        raise UserError(f"search.sampler={s.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if s.objective not in OBJECTIVES:
        raise UserError(f"search.objective={s.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if s.n_trials < 1:
        raise UserError(f"search.n_trials={s.n_trials} must be at least 1")
    if s.workers < 1:
        raise UserError(f"search.workers={s.workers} must be at least 1")
    if s.target_speedup is not None and s.target_speedup <= 1.0:
        raise UserError(f"search.target_speedup={s.target_speedup} must be above 1 (or null)")
    if s.validate_candidates < 1:
        raise UserError(f"search.validate_candidates={s.validate_candidates} must be at least 1")
    if s.cost_model.source not in COST_MODEL_SOURCES:
        raise UserError(
            f"search.cost_model.source={s.cost_model.source!r} is not one of {', '.join(COST_MODEL_SOURCES)}"
        )
    if s.cost_model.probes < 0:
        raise UserError(f"search.cost_model.probes={s.cost_model.probes} must be at least 0")
    if s.latency.repeats < 1 or s.latency.warmup < 0:
        raise UserError("search.latency needs repeats >= 1 and warmup >= 0")
    if not 0.0 <= s.constraints.min_ssim <= 1.0:
        raise UserError(f"search.constraints.min_ssim={s.constraints.min_ssim} must lie in [0, 1]")
    _validate_acceptance(s.acceptance)
    if not 0.0 < s.constraints.max_clip_drop <= 100.0:
        raise UserError(
            f"search.constraints.max_clip_drop={s.constraints.max_clip_drop} must lie in (0, 100] (CLIPScore points)"
        )
    check_space(s.space)
    p = cfg.prompts
    if min(p.presample, p.search, p.validate) < 1:
        raise UserError("prompts.presample, prompts.search and prompts.validate must each be >= 1")
    if not cfg.stages:
        raise UserError(f"stages=[] runs nothing; name at least one of {list(STAGES)}")
    unknown = [stage for stage in cfg.stages if stage not in STAGES]
    if unknown:
        raise UserError(f"stages={list(cfg.stages)}: unknown {unknown}; choose from {list(STAGES)}")
    if "evaluate" in cfg.stages and not cfg.evaluate:
        raise UserError("stages=[evaluate] needs policies to measure: evaluate=[tiny,path/to/policy.yaml]")
    if not cfg.study_name:
        raise UserError("study_name must not be empty")


def _validate_acceptance(a: AcceptanceConfig) -> None:
    from calibrate.quality import GENEVAL_SCORES

    if not 0.5 < a.confidence < 1.0:
        raise UserError(f"search.acceptance.confidence={a.confidence} must lie in (0.5, 1), e.g. 0.95")
    if a.score not in GENEVAL_SCORES:
        raise UserError(f"search.acceptance.score={a.score!r} is not one of {', '.join(GENEVAL_SCORES)}")
    if not 0.0 < a.max_geneval_drop <= 1.0:
        raise UserError(f"search.acceptance.max_geneval_drop={a.max_geneval_drop} must lie in (0, 1]")
    if not 0.0 <= a.min_ssim <= 1.0:
        raise UserError(f"search.acceptance.min_ssim={a.min_ssim} must lie in [0, 1]")
    if not 0.0 < a.max_clip_drop <= 100.0:
        raise UserError(f"search.acceptance.max_clip_drop={a.max_clip_drop} must lie in (0, 100] (CLIPScore points)")
    if a.batch < 2:
        raise UserError(f"search.acceptance.batch={a.batch} must be at least 2 (a bound needs 2 prompts)")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}={value!r} must be an integer")
    return value


def _policy_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"evaluate={value!r} must be a list of policy names or YAML paths")
    return tuple(v.strip() for v in value)


def parse_config(cfg: DictConfig) -> CalibrationConfig:
    """Check and type the composed Hydra config (one-line UserError on any problem)."""
    from toprovar.batching import batch_setting  # lazy: imports torch

    allowed = {f.name for f in fields(CalibrationConfig)}
    extra = sorted(set(cfg.keys()) - allowed)
    if extra:
        raise UserError(f"unknown config key(s) {extra}; known: {sorted(allowed)}")
    try:
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        top = {
            key: OmegaConf.select(cfg, key)
            for key in ("study_name", "seed", "device", "dtype", "export_to", "batch_size")
        }
        stages = tuple(OmegaConf.to_container(cfg.stages, resolve=True))
        evaluate = OmegaConf.to_container(cfg.evaluate, resolve=True) if cfg.get("evaluate") is not None else []
    except OmegaConfBaseException as err:
        raise UserError(f"bad config: {_first_line(err)}") from None
    if not isinstance(backbone, dict) or "name" not in backbone:
        raise UserError("the backbone config needs a `name`; pick one with backbone=tiny|infinity-2b|infinity-8b")
    result = CalibrationConfig(
        backbone=backbone,
        prompts=_typed(PromptsConfig, cfg.get("prompts"), "prompts"),
        search=_typed(SearchConfig, cfg.get("search"), "search"),
        quality=_typed(QualityConfig, cfg.get("quality"), "quality"),
        tracking=_typed(TrackingConfig, cfg.get("tracking"), "tracking"),
        storage=_typed(StorageConfig, cfg.get("storage"), "storage"),
        study_name=str(top["study_name"]),
        seed=_integer(top["seed"], "seed"),
        device=str(top["device"]),
        dtype=str(top["dtype"]),
        export_to=None if top["export_to"] is None else str(top["export_to"]),
        stages=stages,
        batch_size=batch_setting(top["batch_size"], "batch_size"),
        evaluate=_policy_list(evaluate),
    )
    _validate(result)
    return result

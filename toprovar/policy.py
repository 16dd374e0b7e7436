"""Pruning policies: frozen dataclasses mirrored by a versioned YAML schema.

A policy file looks like this (every section optional except `method`)::

    version: 1
    method: toprovar            # none | toprovar | fastvar | fixed_exit
    variant: full               # toprovar only: scale | scale_token | scale_layer | full (Table 10)
    backbone: infinity-2b       # refuses to load onto another backbone; omit for any
    scale:  {tau: 0.4, crossing: below, action: start_pruning, min_scale: 6}
    layer:  {mode: static, beta: 1.0, ratios: [...], skip_above: null, representative_scale: 6}
    token:  {alpha_min: 0.1, alpha_max: 0.6, min_keep: 0.1, normalize: mean, protect_layers: 1,
             restore: none, cache_scale: null, order: entropy}
    fastvar: {ratios: {9: 0.4, 10: 0.6}, layers: [3, 28], cache_scale: 8}
    fixed_exit: {exit_scale: 9}
    provenance: {calibrated: false, source: "paper Table 8", ...}   # free-form, kept verbatim

Scale indices are 0-based positions in the generation schedule. Meaning of each field is in
`../shared/reference/toprovar-method.md` and docs/architecture.md ("Policy and pruning API").
Unknown keys, wrong types and out-of-range values raise `UserError` naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from toprovar.errors import UserError

SCHEMA_VERSION = 1
METHODS = ("none", "toprovar", "fastvar", "fixed_exit")
VARIANTS = ("scale", "scale_token", "scale_layer", "full")
RESTORE_MODES = ("none", "cached", "cached_layer")
ORDERS = ("entropy", "frequency", "edge")
POLICY_DIR = Path(__file__).parent / "policies"


@dataclass(frozen=True)
class ScaleStage:
    """Scale-depth localization: D = first scale s >= min_scale whose ρ_s crosses τ."""

    tau: float = 0.4
    crossing: str = "below"  # below: ρ_s <= τ (appendix A.5); above: ρ_s >= τ (section 4)
    action: str = "start_pruning"  # start_pruning: layer/token pruning from D on; exit: stop after D
    min_scale: int = 0


@dataclass(frozen=True)
class LayerStage:
    """Layer representation score R_l = exp(-β(ϱ_l - 1)) with ϱ_l = σ1/σ2 of the entropy map."""

    mode: str = "static"  # static: ϱ per layer from `ratios`; online: SVD at representative_scale
    beta: float = 1.0
    ratios: tuple[float, ...] | None = None  # static ϱ_l, one per layer (calibration measures them)
    skip_above: float | None = None  # skip a layer outright at scales >= D when R_l >= this
    representative_scale: int | None = None  # online mode: where the SVD runs (default: D's scale - 1)


@dataclass(frozen=True)
class TokenStage:
    """Token gate P_keep = 1 - clip(α_min + (α_max - α_min)·q_i, 0, 1), q_i = φ(s)·R_l·Ĥ_i."""

    alpha_min: float = 0.1
    alpha_max: float = 0.6
    min_keep: float = 0.1  # never keep fewer than this fraction of a scale's tokens in a run layer
    normalize: str = "mean"  # mean: Ĥ = N·H/ΣH; sum: Ĥ = H/ΣH (paper, degenerate); rank: rank/(N-1)
    protect_layers: int = 1  # the first layers of every scale always run on all tokens (entropy probe)
    # What a pruned token gets for a layer it skipped: none = nothing (its hidden state passes
    # through); cached = that layer's update of an earlier, unpruned scale, area-resized to the
    # current grid (FastVAR-style), added once per scale after the last block; cached_layer = the
    # same update added right after each block (FastVAR's granularity; no static plan).
    restore: str = "none"
    # Which tokens a pruned layer keeps: entropy = lowest probe-layer entropy first (the paper);
    # frequency = farthest from the scale's mean input token first (FastVAR's high-pass score on
    # the scale's input, i.e. object edges and texture before flat background); edge = highest
    # local high-pass score first (distance to the 3x3 neighbourhood mean, spread to the
    # neighbours: boundaries before smooth gradient backgrounds). The number kept per layer is
    # Eq. 6's in every case.
    order: str = "entropy"
    cache_scale: int | None = None  # scale whose layer updates restore; None: the last unpruned one


@dataclass(frozen=True)
class FastVARStage:
    """FastVAR cached token pruning (Guo et al. 2025) as the paper configured it (Table 8)."""

    ratios: Mapping[int, float] = field(default_factory=dict)  # scale index -> pruned fraction
    layers: tuple[int, int] = (3, 28)  # blocks [start, end) that prune (official: range(3, 28))
    cache_scale: int | None = None  # scale whose branch outputs restore pruned tokens (default: first pruned - 1)


@dataclass(frozen=True)
class FixedExitStage:
    exit_scale: int = 9  # the last scale that runs; later scales are skipped


@dataclass(frozen=True)
class Policy:
    method: str = "none"
    variant: str = "full"
    backbone: str | None = None
    scale: ScaleStage = field(default_factory=ScaleStage)
    layer: LayerStage = field(default_factory=LayerStage)
    token: TokenStage = field(default_factory=TokenStage)
    fastvar: FastVARStage = field(default_factory=FastVARStage)
    fixed_exit: FixedExitStage = field(default_factory=FixedExitStage)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    version: int = SCHEMA_VERSION
    name: str | None = None

    # Which stages of the paper's framework run (Table 10 variants).
    @property
    def uses_layer(self) -> bool:
        return self.method == "toprovar" and self.variant in ("scale_layer", "full")

    @property
    def uses_token(self) -> bool:
        return self.method == "toprovar" and self.variant in ("scale_token", "full")

    def check_backbone(self, backbone: str) -> None:
        if self.backbone is not None and self.backbone != backbone:
            raise UserError(f"policy {self.name or ''} was made for backbone '{self.backbone}', not "
                            f"'{backbone}'; use a policy of '{backbone}' or recalibrate".replace("policy  ", "policy "))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer"]["ratios"] = list(self.layer.ratios) if self.layer.ratios is not None else None
        out["fastvar"]["ratios"] = {int(k): float(v) for k, v in self.fastvar.ratios.items()}
        out["fastvar"]["layers"] = list(self.fastvar.layers)
        out["provenance"] = dict(self.provenance)
        out.pop("name")
        return out


def paper_defaults() -> dict[str, float]:
    """The paper's / this project's default knobs of the ToProVAR gate (warm start of the search)."""
    return {"tau": ScaleStage.tau, "beta": LayerStage.beta, "alpha_min": TokenStage.alpha_min,
            "alpha_max": TokenStage.alpha_max, "min_keep": TokenStage.min_keep}


# -- validation ------------------------------------------------------------------------------------

def _fail(where: str, message: str) -> UserError:
    return UserError(f"policy {where}: {message}")


def _number(value: Any, where: str, lo: float | None = None, hi: float | None = None,
            integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(where, f"must be {kind}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(where, f"{value} is out of range [{lo if lo is not None else '-inf'}, "
                           f"{hi if hi is not None else 'inf'}]")
    return int(value) if integer else float(value)


def _choice(value: Any, where: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise _fail(where, f"{value!r} is not one of {', '.join(options)}")
    return value


def _section(data: Any, where: str, cls: type) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    return dict(data)


def _scale(data: Any) -> ScaleStage:
    d = _section(data, "scale", ScaleStage)
    out = ScaleStage()
    return ScaleStage(
        tau=_number(d.get("tau", out.tau), "scale.tau", 0.0, 1.0),
        crossing=_choice(d.get("crossing", out.crossing), "scale.crossing", ("below", "above")),
        action=_choice(d.get("action", out.action), "scale.action", ("start_pruning", "exit")),
        min_scale=_number(d.get("min_scale", out.min_scale), "scale.min_scale", 0, None, integer=True),
    )


def _layer(data: Any) -> LayerStage:
    d = _section(data, "layer", LayerStage)
    out = LayerStage()
    ratios = d.get("ratios")
    if ratios is not None:
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise _fail("layer.ratios", "must be a non-empty list of σ1/σ2 ratios, one per layer")
        ratios = tuple(_number(r, f"layer.ratios[{i}]", 1.0, None) for i, r in enumerate(ratios))
    skip = d.get("skip_above")
    rep = d.get("representative_scale")
    mode = _choice(d.get("mode", out.mode), "layer.mode", ("static", "online"))
    return LayerStage(
        mode=mode,
        beta=_number(d.get("beta", out.beta), "layer.beta", 0.0, 100.0),
        ratios=ratios,
        skip_above=None if skip is None else _number(skip, "layer.skip_above", 0.0, 1.0),
        representative_scale=None if rep is None else _number(rep, "layer.representative_scale", 0, None, integer=True),
    )


def _token(data: Any) -> TokenStage:
    d = _section(data, "token", TokenStage)
    out = TokenStage()
    stage = TokenStage(
        alpha_min=_number(d.get("alpha_min", out.alpha_min), "token.alpha_min", 0.0, 1.0),
        alpha_max=_number(d.get("alpha_max", out.alpha_max), "token.alpha_max", 0.0, 1.0),
        min_keep=_number(d.get("min_keep", out.min_keep), "token.min_keep", 0.0, 1.0),
        normalize=_choice(d.get("normalize", out.normalize), "token.normalize", ("mean", "sum", "rank")),
        protect_layers=_number(d.get("protect_layers", out.protect_layers), "token.protect_layers", 1, None, integer=True),
        restore=_choice(d.get("restore", out.restore), "token.restore", RESTORE_MODES),
        order=_choice(d.get("order", out.order), "token.order", ORDERS),
        cache_scale=None if d.get("cache_scale") is None else
        _number(d["cache_scale"], "token.cache_scale", 0, None, integer=True),
    )
    if stage.alpha_max < stage.alpha_min:
        raise _fail("token.alpha_max", f"{stage.alpha_max} is below token.alpha_min={stage.alpha_min}")
    return stage


def _fastvar(data: Any) -> FastVARStage:
    d = _section(data, "fastvar", FastVARStage)
    ratios = d.get("ratios", {}) or {}
    if not isinstance(ratios, Mapping):
        raise _fail("fastvar.ratios", "must map scale index -> pruned fraction, e.g. {9: 0.4, 10: 0.6}")
    parsed: dict[int, float] = {}
    for k, v in ratios.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            raise _fail("fastvar.ratios", f"key {k!r} is not a scale index") from None
        parsed[_number(key, "fastvar.ratios key", 0, None, integer=True)] = _number(v, f"fastvar.ratios[{key}]", 0.0, 1.0)
    layers = d.get("layers", FastVARStage().layers)
    if not isinstance(layers, (list, tuple)) or len(layers) != 2:
        raise _fail("fastvar.layers", "must be [start, end) block indices")
    start = _number(layers[0], "fastvar.layers[0]", 0, None, integer=True)
    end = _number(layers[1], "fastvar.layers[1]", start, None, integer=True)
    cache = d.get("cache_scale")
    return FastVARStage(ratios=parsed, layers=(start, end),
                        cache_scale=None if cache is None else _number(cache, "fastvar.cache_scale", 0, None, integer=True))


def _fixed_exit(data: Any) -> FixedExitStage:
    d = _section(data, "fixed_exit", FixedExitStage)
    return FixedExitStage(exit_scale=_number(d.get("exit_scale", FixedExitStage.exit_scale),
                                             "fixed_exit.exit_scale", 0, None, integer=True))


def policy_from_dict(data: Mapping[str, Any], name: str | None = None) -> Policy:
    """Validate a parsed YAML document into a Policy (one-line UserError on any problem)."""
    if not isinstance(data, Mapping):
        raise _fail("document", f"must be a mapping, got {type(data).__name__}")
    d = _section(data, "", Policy)
    version = d.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise _fail("version", f"{version!r} is not supported (this toprovar reads version {SCHEMA_VERSION})")
    if "method" not in d:
        raise _fail("method", f"missing (one of {', '.join(METHODS)})")
    backbone = d.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        raise _fail("backbone", f"must be a backbone name, got {backbone!r}")
    provenance = d.get("provenance") or {}
    if not isinstance(provenance, Mapping):
        raise _fail("provenance", "must be a mapping")
    return Policy(
        method=_choice(d["method"], "method", METHODS),
        variant=_choice(d.get("variant", "full"), "variant", VARIANTS),
        backbone=backbone,
        scale=_scale(d.get("scale")),
        layer=_layer(d.get("layer")),
        token=_token(d.get("token")),
        fastvar=_fastvar(d.get("fastvar")),
        fixed_exit=_fixed_exit(d.get("fixed_exit")),
        provenance=dict(provenance),
        version=SCHEMA_VERSION,
        name=name,
    )


def shipped_policies() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def load_policy(path_or_name: str | Path | Policy, backbone: str | None = None) -> Policy:
    """A Policy from a YAML path, a shipped name (`toprovar/policies/<name>.yaml`) or 'none'.

    With `backbone`, a policy made for another backbone is refused.
    """
    if isinstance(path_or_name, Policy):
        policy = path_or_name
    elif str(path_or_name) == "none":
        policy = Policy(method="none", name="none")
    else:
        path = Path(path_or_name).expanduser()
        if not path.suffix and not path.exists():
            path = POLICY_DIR / f"{path_or_name}.yaml"
            if not path.exists():
                raise UserError(f"unknown policy '{path_or_name}': not a file and not a shipped policy "
                                f"(shipped: {', '.join(shipped_policies()) or 'none'})")
        if not path.is_file():
            raise UserError(f"{path}: policy file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        try:
            policy = policy_from_dict(data, name=path.stem)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    if backbone is not None:
        policy.check_backbone(backbone)
    return policy


def save_policy(policy: Policy, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False))
    return path

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
    fastvar: {ratios: {9: 0.4, 10: 0.6}, layers: [3, 28], cache_scale: 8, exit_after_scale: null, plan: per_block}
    fixed_exit: {exit_scale: 9}
    guidance: {skip_uncond_from_scale: null}   # any method: conditional rows only from this scale on
    provenance: {calibrated: false, source: "paper Table 8", ...}   # free-form, kept verbatim

Scale indices are 0-based positions in the generation schedule. Meaning of each field is in
`../shared/reference/toprovar-method.md` and docs/architecture.md ("Policy and pruning API").

Checked in two steps, both before any weights load, each problem one `UserError` line naming
the key, the value and what is allowed: the schema (`policy_from_dict`: unknown keys, types,
finite numbers only, ranges, orders between fields; `load_policy` adds unreadable, binary,
oversized and malformed files), then the run (`check_policy_for_backbone`/`check_policy_for_spec`:
the policy's backbone, scale indices within the schedule in use, one layer ratio per block).
`save_policy` writes a document that loads back equal.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toprovar.errors import UserError

SCHEMA_VERSION = 1
METHODS = ("none", "toprovar", "fastvar", "fixed_exit")
FASTVAR_PLANS = ("per_block", "per_scale")
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
    """FastVAR cached token pruning (Guo et al. 2025): the ToProVAR paper's Table 8 configuration
    or the authors' own for Infinity (csguoh/FastVAR; toprovar/pruning/fastvar.py says what differs)."""

    ratios: Mapping[int, float] = field(default_factory=dict)  # scale index -> pruned fraction
    layers: tuple[int, int] = (3, 28)  # blocks [start, end) that prune (official: range(3, 28))
    cache_scale: int | None = None  # scale whose branch outputs restore pruned tokens (default: first pruned - 1)
    # The last scale that runs; later scales are skipped outright and the image is decoded from the
    # codes so far (the authors' Infinity code skips the 48x48 and 64x64 scales). None: every scale.
    exit_after_scale: int | None = None
    # Which tokens a pruned block runs: per_block = FastVAR's score recomputed from each block's
    # input; per_scale = scored once at the first pruned block's input and kept for every pruned
    # block of the scale (a plan fixed after the unpruned blocks: the fast path's planned units).
    plan: str = "per_block"


@dataclass(frozen=True)
class GuidanceStage:
    """Classifier-free guidance at run time, for any method."""

    # From this scale on only the conditional rows run (the batch halves; guidance scale 1 there):
    # where guidance stops changing the image its unconditional branch is wasted work. None: never.
    skip_uncond_from_scale: int | None = None


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
    guidance: GuidanceStage = field(default_factory=GuidanceStage)
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
            raise UserError(
                f"policy {self.name or ''} was made for backbone '{self.backbone}', not "
                f"'{backbone}'; use a policy of '{backbone}' or recalibrate".replace("policy  ", "policy ")
            )

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
    return {
        "tau": ScaleStage.tau,
        "beta": LayerStage.beta,
        "alpha_min": TokenStage.alpha_min,
        "alpha_max": TokenStage.alpha_max,
        "min_keep": TokenStage.min_keep,
    }


# -- validation ------------------------------------------------------------------------------------

# The keys a policy document may have (`name` is the file's stem, not a key of the file).
DOCUMENT_KEYS = tuple(f.name for f in dataclasses.fields(Policy) if f.name != "name")
# A policy is a few KiB (Infinity-8B's 40 layer ratios plus provenance); a file far larger is not one.
MAX_FILE_BYTES = 1 << 20
_SHOWN_CHARS = 40  # values are quoted in errors up to this length (a message stays one short line)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _fail(where: str, message: str) -> UserError:
    return UserError(f"policy {where}: {message}")


def _bad(where: str, value: Any, expected: str) -> UserError:
    """The one-line error for a bad value: the key, the value given and what is allowed."""
    return _fail(where, f"got {_show(value)}, expected {expected}")


def _bound(x: float | int) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _expected(lo: float | int | None, hi: float | int | None, integer: bool) -> str:
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        return f"{kind} in [{_bound(lo)}, {_bound(hi)}]"
    if lo is not None:
        return f"{kind} >= {_bound(lo)}"
    return kind if hi is None else f"{kind} <= {_bound(hi)}"


def _number(
    value: Any, where: str, lo: float | int | None = None, hi: float | int | None = None, integer: bool = False
) -> float | int:
    """A finite number (or an integer) within [lo, hi]; NaN, ±inf, bools and strings are errors."""
    expected = _expected(lo, hi, integer)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(where, value, expected)
    if not integer:
        try:
            value = float(value)  # an integer beyond float range overflows: not finite either
        except OverflowError:
            raise _bad(where, value, expected) from None
        if not math.isfinite(value):
            raise _bad(where, value, expected)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(where, value, expected)
    return int(value) if integer else value


def _optional_index(value: Any, where: str) -> int | None:
    return None if value is None else _number(value, where, 0, None, integer=True)


def _choice(value: Any, where: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise _bad(where, value, f"one of {', '.join(options)}")
    return value


def _section(data: Any, where: str, known: tuple[str, ...]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise _bad(where, data, f"a mapping with the keys {', '.join(known)}")
    unknown = [k for k in data if k not in known]
    if unknown:
        key = unknown[0]
        key = (
            key
            if isinstance(key, str) and key.isprintable() and key.strip() and len(key) <= _SHOWN_CHARS
            else _show(key)
        )
        raise _fail(f"{where}.{key}" if where else key, f"unknown key (known: {', '.join(known)})")
    return dict(data)


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _scale(data: Any) -> ScaleStage:
    d = _section(data, "scale", _keys(ScaleStage))
    out = ScaleStage()
    return ScaleStage(
        tau=_number(d.get("tau", out.tau), "scale.tau", 0.0, 1.0),
        crossing=_choice(d.get("crossing", out.crossing), "scale.crossing", ("below", "above")),
        action=_choice(d.get("action", out.action), "scale.action", ("start_pruning", "exit")),
        min_scale=_number(d.get("min_scale", out.min_scale), "scale.min_scale", 0, None, integer=True),
    )


def _layer(data: Any) -> LayerStage:
    d = _section(data, "layer", _keys(LayerStage))
    out = LayerStage()
    ratios = d.get("ratios")
    if ratios is not None:
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise _bad("layer.ratios", ratios, "a non-empty list of σ1/σ2 ratios (finite, >= 1), one per layer")
        ratios = tuple(_number(r, f"layer.ratios[{i}]", 1.0, None) for i, r in enumerate(ratios))
    skip = d.get("skip_above")
    return LayerStage(
        mode=_choice(d.get("mode", out.mode), "layer.mode", ("static", "online")),
        beta=_number(d.get("beta", out.beta), "layer.beta", 0.0, 100.0),
        ratios=ratios,
        skip_above=None if skip is None else _number(skip, "layer.skip_above", 0.0, 1.0),
        representative_scale=_optional_index(d.get("representative_scale"), "layer.representative_scale"),
    )


def _token(data: Any, min_scale: int) -> TokenStage:
    d = _section(data, "token", _keys(TokenStage))
    out = TokenStage()
    stage = TokenStage(
        alpha_min=_number(d.get("alpha_min", out.alpha_min), "token.alpha_min", 0.0, 1.0),
        alpha_max=_number(d.get("alpha_max", out.alpha_max), "token.alpha_max", 0.0, 1.0),
        min_keep=_number(d.get("min_keep", out.min_keep), "token.min_keep", 0.0, 1.0),
        normalize=_choice(d.get("normalize", out.normalize), "token.normalize", ("mean", "sum", "rank")),
        protect_layers=_number(
            d.get("protect_layers", out.protect_layers), "token.protect_layers", 1, None, integer=True
        ),
        restore=_choice(d.get("restore", out.restore), "token.restore", RESTORE_MODES),
        order=_choice(d.get("order", out.order), "token.order", ORDERS),
        cache_scale=_optional_index(d.get("cache_scale"), "token.cache_scale"),
    )
    if stage.alpha_max < stage.alpha_min:
        raise _bad("token.alpha_max", stage.alpha_max, f"a number in [token.alpha_min={stage.alpha_min:g}, 1]")
    # Restoration reads the cache scale's updates of every layer, so it must run every token:
    # pruning can start at min_scale, and a later cache scale would restore from nothing.
    if stage.cache_scale is not None and stage.cache_scale >= min_scale:
        raise _bad(
            "token.cache_scale",
            stage.cache_scale,
            f"an integer in [0, scale.min_scale - 1 = {min_scale - 1}] (a scale that runs every token)"
            if min_scale > 0
            else "null: with scale.min_scale 0 no scale is sure to run every token",
        )
    return stage


def _scale_key(key: Any) -> int:
    """A fastvar.ratios key: an integer scale index (YAML int, or a string of digits)."""
    if isinstance(key, str) and re.fullmatch(r"[0-9]+", key.strip()):
        return int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise _fail(
            "fastvar.ratios",
            f"got key {_show(key)}, expected scale indices (integers >= 0) as keys, e.g. {{9: 0.4, 10: 0.6}}",
        )
    return key


def _fastvar(data: Any, method: str) -> FastVARStage:
    d = _section(data, "fastvar", _keys(FastVARStage))
    ratios = d.get("ratios")
    ratios = {} if ratios is None else ratios
    if not isinstance(ratios, Mapping):
        raise _bad("fastvar.ratios", ratios, "a mapping scale index -> pruned fraction, e.g. {9: 0.4, 10: 0.6}")
    parsed: dict[int, float] = {}
    for k, v in ratios.items():
        key = _scale_key(k)
        if key in parsed:
            raise _fail("fastvar.ratios", f"scale {key} is given twice")
        parsed[key] = _number(v, f"fastvar.ratios[{key}]", 0.0, 1.0)
    if method == "fastvar" and not parsed:
        raise _bad("fastvar.ratios", ratios, "the scales a fastvar policy prunes, e.g. {9: 0.4, 10: 0.6}")
    layers = d.get("layers", FastVARStage().layers)
    if not isinstance(layers, (list, tuple)) or len(layers) != 2:
        raise _bad("fastvar.layers", layers, "[start, end): the block indices that prune, start < end")
    start = _number(layers[0], "fastvar.layers[0]", 0, None, integer=True)
    end = _number(layers[1], "fastvar.layers[1]", start + 1, None, integer=True)
    cache = _optional_index(d.get("cache_scale"), "fastvar.cache_scale")
    # The branch outputs are cached at a scale that runs every token (FastVAR: the one before the first pruned).
    if cache is not None and parsed and cache >= min(parsed):
        first = min(parsed)
        raise _bad(
            "fastvar.cache_scale",
            cache,
            f"an integer in [0, {first - 1}] (before the first pruned scale, {first}, so that it runs every token)"
            if first > 0
            else "null: scale 0 is pruned, so no earlier scale runs every token",
        )
    exit_after = _optional_index(d.get("exit_after_scale"), "fastvar.exit_after_scale")
    # A pruned scale after the exit would never run: the policy would silently prune less than it says.
    if exit_after is not None and parsed and max(parsed) > exit_after:
        raise _bad(
            "fastvar.exit_after_scale",
            exit_after,
            f"an integer >= {max(parsed)}, the last scale fastvar.ratios prunes (later scales do not run)",
        )
    plan = _choice(d.get("plan", FastVARStage.plan), "fastvar.plan", FASTVAR_PLANS)
    return FastVARStage(ratios=parsed, layers=(start, end), cache_scale=cache, exit_after_scale=exit_after, plan=plan)


def _fixed_exit(data: Any) -> FixedExitStage:
    d = _section(data, "fixed_exit", _keys(FixedExitStage))
    return FixedExitStage(
        exit_scale=_number(
            d.get("exit_scale", FixedExitStage.exit_scale), "fixed_exit.exit_scale", 0, None, integer=True
        )
    )


def _guidance(data: Any) -> GuidanceStage:
    d = _section(data, "guidance", _keys(GuidanceStage))
    return GuidanceStage(
        skip_uncond_from_scale=_optional_index(d.get("skip_uncond_from_scale"), "guidance.skip_uncond_from_scale")
    )


def policy_from_dict(data: Mapping[str, Any], name: str | None = None) -> Policy:
    """Validate a parsed YAML document into a Policy (one-line UserError on any problem).

    Checks the schema alone (types, finite numbers, ranges, keys, orders between fields); what
    depends on the backbone (scale indices, layer counts, its name) is `check_policy_for_backbone`.
    """
    if not isinstance(data, Mapping):
        expected = "a mapping of policy keys (method: ..., scale: ..., ...)"
        raise _fail("document", f"is empty, expected {expected}") if data is None else _bad("document", data, expected)
    d = _section(data, "", DOCUMENT_KEYS)
    version = d.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise _bad("version", version, f"{SCHEMA_VERSION} (the schema version this toprovar reads)")
    if "method" not in d:
        raise _fail("method", f"missing (one of {', '.join(METHODS)})")
    method = _choice(d["method"], "method", METHODS)
    backbone = d.get("backbone")
    if backbone is not None and (not isinstance(backbone, str) or not backbone.strip()):
        raise _bad("backbone", backbone, "a backbone name, e.g. tiny or infinity-2b (or no backbone key)")
    provenance = d.get("provenance")
    provenance = {} if provenance is None else provenance
    if not isinstance(provenance, Mapping):
        raise _bad("provenance", provenance, "a mapping (free-form record of how the policy was made)")
    scale = _scale(d.get("scale"))
    return Policy(
        method=method,
        variant=_choice(d.get("variant", "full"), "variant", VARIANTS),
        backbone=backbone,
        scale=scale,
        layer=_layer(d.get("layer")),
        token=_token(d.get("token"), scale.min_scale),
        fastvar=_fastvar(d.get("fastvar"), method),
        fixed_exit=_fixed_exit(d.get("fixed_exit")),
        guidance=_guidance(d.get("guidance")),
        provenance=dict(provenance),
        version=SCHEMA_VERSION,
        name=name,
    )


# -- the backbone in use ---------------------------------------------------------------------------


def check_policy_for_backbone(
    policy: Policy,
    *,
    backbone: str,
    n_scales: int,
    depth: int,
    allow_other_backbone: bool = False,
    pixels: str | None = None,
) -> Policy:
    """Refuse a policy that does not fit the run: its backbone, the schedule's scales, the depth.

    Needs no weights: `n_scales` is the length of the schedule the run will use (it depends on the
    pixel budget; `check_policy_for_spec` derives it), `depth` the transformer's block count.
    Checked for the sections the method runs: toprovar — scale.min_scale, layer.representative_scale,
    token.cache_scale below n_scales, layer.ratios one per layer, token.protect_layers below depth
    (otherwise no layer is left to prune); fastvar — ratio scales and cache_scale below n_scales,
    layers' end <= depth, exit_after_scale below n_scales; fixed_exit — exit_scale below n_scales; every
    method — guidance.skip_uncond_from_scale below n_scales. Without these a scale past the
    schedule or a surplus layer is silently never reached and the run is unpruned (issue 15).
    A policy made for another backbone is refused unless `allow_other_backbone` (an explicit
    user override). Returns `policy`; raises a one-line UserError naming key, value and range.
    """
    if not allow_other_backbone:
        policy.check_backbone(backbone)
    run = f"backbone '{backbone}'{f' at pixels={pixels}' if pixels else ''}: {n_scales} scales, {depth} layers"
    label = f"policy {policy.name}: " if policy.name else "policy "

    def fail(where: str, got: str, expected: str) -> UserError:
        return UserError(f"{label}{where}: got {got}, expected {expected} ({run})")

    def scale_index(where: str, value: int | None) -> None:
        if value is not None and not 0 <= value < n_scales:
            raise fail(where, _show(value), f"a scale index in [0, {n_scales - 1}]")

    if policy.method == "toprovar":
        scale_index("scale.min_scale", policy.scale.min_scale)
        scale_index("layer.representative_scale", policy.layer.representative_scale)
        scale_index("token.cache_scale", policy.token.cache_scale)
        ratios = policy.layer.ratios
        if ratios is not None and len(ratios) != depth:
            raise fail("layer.ratios", f"{len(ratios)} values", f"{depth}, one per layer; recalibrate for it")
        if policy.token.protect_layers >= depth:
            raise fail("token.protect_layers", _show(policy.token.protect_layers), f"an integer in [1, {depth - 1}]")
    elif policy.method == "fastvar":
        for key in policy.fastvar.ratios:
            if not 0 <= key < n_scales:
                raise fail("fastvar.ratios", f"key {key}", f"scale indices in [0, {n_scales - 1}] as keys")
        scale_index("fastvar.cache_scale", policy.fastvar.cache_scale)
        scale_index("fastvar.exit_after_scale", policy.fastvar.exit_after_scale)
        start, end = policy.fastvar.layers
        if end > depth:
            raise fail("fastvar.layers", _show([start, end]), f"[start, end) with end <= {depth}")
    elif policy.method == "fixed_exit":
        scale_index("fixed_exit.exit_scale", policy.fixed_exit.exit_scale)
    scale_index("guidance.skip_uncond_from_scale", policy.guidance.skip_uncond_from_scale)
    return policy


def check_policy_for_spec(
    policy: Policy,
    spec: Any,
    *,
    pixels: str | None = None,
    h_div_w: float | None = None,
    allow_other_backbone: bool = False,
) -> Policy:
    """`check_policy_for_backbone` for a registered backbone (a name or a BackboneSpec), no weights loaded.

    The schedule is the one `toprovar.pipeline.generate` will use: `pixels` (default: the
    backbone's) and the template nearest to `h_div_w` (default 1.0).
    """
    from toprovar.models.registry import get_backbone  # lazy: the schema itself needs no torch

    spec = get_backbone(spec)
    pixels = pixels or spec.pixels
    n_scales = len(spec.schedules.scale_schedule(1.0 if h_div_w is None else h_div_w, pixels))
    return check_policy_for_backbone(
        policy,
        backbone=spec.name,
        n_scales=n_scales,
        depth=spec.transformer.depth,
        allow_other_backbone=allow_other_backbone,
        pixels=pixels,
    )


# -- files -----------------------------------------------------------------------------------------


def shipped_policies() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context or type(err).__name__} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err)


def read_policy_document(path: Path) -> Any:
    """The parsed YAML of a policy file; unreadable, oversized, binary or malformed files are UserErrors."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {size} bytes is not a policy file (policies are YAML files of a few KiB)")
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the policy file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text file (byte {err.start} is not UTF-8); a policy is a YAML file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise UserError(f"{path}: not a policy (YAML nested too deeply)") from None


def _resolve(path_or_name: str | Path) -> Path:
    """A policy file path from a path or a shipped name."""
    if not str(path_or_name).strip():
        raise UserError("policy name is empty; give a shipped policy name, a YAML path or none")
    try:
        path = Path(path_or_name).expanduser()
        if not path.suffix and not path.is_file():  # a shipped name (before a folder of that name)
            shipped = POLICY_DIR / f"{path_or_name}.yaml"
            if shipped.is_file():
                path = shipped
            elif not path.exists():
                raise UserError(
                    f"unknown policy {_show(str(path_or_name))}: not a file and not a shipped policy "
                    f"(shipped: {', '.join(shipped_policies()) or 'none'})"
                )
        if path.is_dir():
            raise UserError(f"{path}: is a folder, not a policy file (give a policy YAML file or a shipped name)")
        if not path.is_file():
            raise UserError(f"{path}: policy file not found")
    except (OSError, ValueError) as err:  # e.g. a name too long for the file system, a NUL byte
        raise UserError(f"policy {_show(str(path_or_name))}: not a usable file name ({err})") from None
    return path


def load_policy(
    path_or_name: str | Path | Policy,
    backbone: Any = None,
    *,
    pixels: str | None = None,
    h_div_w: float | None = None,
    allow_other_backbone: bool = False,
) -> Policy:
    """A Policy from a YAML path, a shipped name (`toprovar/policies/<name>.yaml`) or 'none'.

    The document is checked against the schema (`policy_from_dict`). `backbone` adds the checks
    against the run: a name refuses a policy made for another backbone; a `BackboneSpec` (from
    `toprovar.models.registry.get_backbone`, no weights) also checks scale indices against the
    schedule of `pixels`/`h_div_w` and layer counts against its depth (`check_policy_for_spec`).
    `allow_other_backbone` waives the name check only. Every problem is a one-line UserError.
    """
    if isinstance(path_or_name, Policy):
        policy = path_or_name
    elif not isinstance(path_or_name, (str, Path)):
        raise UserError(
            f"policy={_show(path_or_name)} is not a policy: give a shipped name "
            f"({', '.join(shipped_policies())}), a YAML path or none"
        )
    elif str(path_or_name) == "none":
        policy = Policy(method="none", name="none")
    else:
        path = _resolve(path_or_name)
        data = read_policy_document(path)
        try:
            policy = policy_from_dict(data, name=path.stem)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    if isinstance(backbone, str):
        if not allow_other_backbone:
            policy.check_backbone(backbone)
    elif backbone is not None:
        check_policy_for_spec(
            policy, backbone, pixels=pixels, h_div_w=h_div_w, allow_other_backbone=allow_other_backbone
        )
    return policy


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write `policy` as YAML; `load_policy(save_policy(p, path))` equals `p` (its name: the file's stem).

    The policy is checked against the schema first, so a file written here always loads.
    """
    document = policy.to_dict()
    policy_from_dict(document, name=policy.name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ASCII with escapes: PyYAML writes a raw NEL/U+2028 with allow_unicode=True and reads it back as a line break.
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path

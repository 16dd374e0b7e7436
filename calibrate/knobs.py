"""The searched policy knobs, declared once: the table `KNOBS` and everything that follows from it.

One row per knob: the Optuna parameter name (also its key under `search.space` in
toprovar/conf/search/*.yaml, which holds its range), the policy field it sets, its kind, the hard limits a
configured range must respect, and whether it is sampled on a log scale. From the table come
config validation (`check_space`), the Optuna space (`SearchSpace.suggest`, `clip`), the paper
defaults that warm-start a study (read from the policy dataclasses of `toprovar.policy`, never
repeated here) and the policy document a trial's parameters turn into. Adding a knob is one row
here plus its range line in toprovar/conf/search/default.yaml.

`alpha_span` sets `token.alpha_max` as a share of the way from α_min to 1:
α_max = α_min + span·(1 − α_min). Every (α_min, span) of the box is a valid gate (α_max ≥ α_min), so
each parameter keeps one fixed distribution and NSGA-II, GPSampler and multivariate TPE model them
jointly (a range of α_max that moved with α_min made Optuna treat α_max as a new parameter each
trial). Parameters that name a policy field directly (`alpha_max` in studies made before the span)
still turn into the same policy; a knob missing from the parameters keeps its default.

A knob whose policy value may be null ("never") has `never`: knob values at or above
`never(summary)` are that null, so the search can pick it like any integer (`skip_uncond_from_scale`:
the scale count means no CFG skip, the policy default, which the warm start clips to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import optuna

from toprovar.errors import UserError
from toprovar.policy import ORDERS, RESTORE_MODES, SCHEMA_VERSION, Policy, policy_from_dict

FLOAT, INT, CATEGORICAL = "float", "int", "categorical"
# toprovar.policy checks scale.action against the same two values (it exports no constant for them).
ACTIONS = ("start_pruning", "exit")


@dataclass(frozen=True)
class Knob:
    name: str  # Optuna parameter and `search.space` key
    path: str  # the policy field it sets, "section.field"
    kind: str  # float | int | categorical
    limits: tuple  # float/int: hard (low, high) of any range, None = unbounded; categorical: options
    log: bool = False  # sample on a log scale
    span_of: str | None = None  # the policy value is span_of's value + knob·(span_of's upper limit − that value)
    # A null range in the config means this range, taken from the pre-sampling summary.
    measured: Callable[[Any], tuple] | None = None
    capped: bool = False  # a configured range may not go past the measured range's upper end
    never: Callable[[Any], int] | None = None  # values >= never(summary) mean null in the policy
    # The backbone's own upper end (from the summary): a configured range is clipped to it, so one
    # YAML default serves every depth (a 2-layer test backbone protects at most 1 layer).
    ceiling: Callable[[Any], int | None] | None = None

    @property
    def section(self) -> str:
        return self.path.split(".")[0]

    @property
    def field(self) -> str:
        return self.path.split(".")[1]

    def cast(self, value: Any) -> Any:
        return {FLOAT: float, INT: int, CATEGORICAL: str}[self.kind](value)


KNOBS: tuple[Knob, ...] = (
    Knob("tau", "scale.tau", FLOAT, (0.0, 1.0), measured=lambda summary: tuple(summary.tau_range)),
    # First scale where D may fall; null: every scale after the first.
    Knob(
        "min_scale",
        "scale.min_scale",
        INT,
        (0, None),
        measured=lambda summary: (1, max(1, summary.scales - 1)),
        capped=True,
    ),
    Knob("action", "scale.action", CATEGORICAL, ACTIONS),
    # Log scale from far below 1: measured σ1/σ2 ratios can be far above 1. The policy caps β at 100.
    Knob("beta", "layer.beta", FLOAT, (1e-6, 100.0), log=True),
    Knob("alpha_min", "token.alpha_min", FLOAT, (0.0, 1.0)),
    Knob("alpha_span", "token.alpha_max", FLOAT, (0.0, 1.0), span_of="alpha_min"),
    Knob("min_keep", "token.min_keep", FLOAT, (0.0, 1.0)),
    Knob(
        "protect_layers",
        "token.protect_layers",
        INT,
        (1, None),
        ceiling=lambda summary: len(summary.layer_ratios) - 1 if summary.layer_ratios else None,
    ),
    Knob("restore", "token.restore", CATEGORICAL, RESTORE_MODES),
    Knob("order", "token.order", CATEGORICAL, ORDERS),
    # First scale that runs only the conditional rows (CFG skip); `scales` = never. Searched where the
    # backbone runs guidance (pre-sampling saw 2B rows), fixed to never otherwise.
    Knob(
        "skip_uncond_from_scale",
        "guidance.skip_uncond_from_scale",
        INT,
        (0, None),
        measured=lambda summary: (1 if summary.guided else summary.scales, summary.scales),
        capped=True,
        never=lambda summary: summary.scales,
    ),
)
BY_NAME = {knob.name: knob for knob in KNOBS}


# --- knob values <-> policy values -------------------------------------------------------------
def _spanned(knob: Knob, value: float, base: float) -> float:
    top = BY_NAME[knob.span_of].limits[1]
    return min(top, base + value * (top - base))


def paper_defaults() -> dict[str, Any]:
    """The knobs of the default policy (the paper's τ = 0.4 and this project's gate defaults), read
    from the policy dataclasses; the warm-start trial of every study."""
    defaults = Policy()
    out: dict[str, Any] = {}
    for knob in KNOBS:
        value = getattr(getattr(defaults, knob.section), knob.field)
        if knob.span_of is not None:  # the span that gives the default policy value
            base, top = out[knob.span_of], BY_NAME[knob.span_of].limits[1]
            value = (value - base) / (top - base) if top > base else 0.0
        out[knob.name] = value
    return out


def policy_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """Policy field path -> value for a trial's parameters (missing knobs: their defaults)."""
    defaults = paper_defaults()
    by_name: dict[str, Any] = {}  # knob name -> its policy value (the base of a span)
    out: dict[str, Any] = {}
    for knob in KNOBS:
        if knob.name not in params and knob.field != knob.name and knob.field in params:
            value = knob.cast(params[knob.field])  # the policy value itself (studies before the span)
        else:
            value = params.get(knob.name, defaults[knob.name])
            value = None if value is None else knob.cast(value)  # None: a `never` knob's default
            if knob.span_of is not None:
                value = _spanned(knob, value, by_name[knob.span_of])
        by_name[knob.name] = out[knob.path] = value
    return out


def policy_document(params: Mapping[str, Any], summary: Any, backbone: str) -> dict[str, Any]:
    """The ToProVAR policy of a trial as YAML-ready data (schema of toprovar.policy).

    `summary` is the pre-sampling summary: the crossing direction and the static layer ratios come
    from it; the rest of the schema keeps its defaults.
    """
    document: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "method": "toprovar",
        "variant": "full",
        "backbone": backbone,
        "scale": {"crossing": summary.crossing},
        "layer": {"mode": "static", "ratios": [max(1.0, float(r)) for r in summary.layer_ratios]},
        "token": {},
        "guidance": {},
    }
    for knob in KNOBS:
        value = policy_values(params)[knob.path]
        if knob.never is not None and value is not None and value >= knob.never(summary):
            value = None
        document[knob.section][knob.field] = value
    for section in ("scale", "layer", "token"):  # the schema's field order, as in every policy file
        order = [f.name for f in fields(getattr(Policy(), section))]
        document[section] = dict(sorted(document[section].items(), key=lambda item: order.index(item[0])))
    return document


class PolicyFactory:
    """`params -> Policy` for one backbone and one pre-sampling summary."""

    def __init__(self, summary: Any, backbone: str):
        self.summary, self.backbone = summary, backbone

    def document(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return policy_document(params, self.summary, self.backbone)

    def __call__(self, params: Mapping[str, Any]) -> Policy:
        return policy_from_dict(self.document(params))


# --- the configured space ------------------------------------------------------------------------
def _number(value: Any, kind: str) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if kind == INT else (int, float))


def probe_layer_counts(space: Mapping[str, Any]) -> list[int]:
    """Every `token.protect_layers` the search may pick (its [low, high] in `search.space`, checked by
    `check_space`): the pre-sampling records ρ_s read from each, where the runtime reads it."""
    low, high = space["protect_layers"]
    return list(range(int(low), int(high) + 1))


def check_space(space: Mapping[str, Any]) -> None:
    """One-line UserError unless `space` has a valid entry for exactly the knobs of the table."""
    unknown = sorted(set(space) - set(BY_NAME))
    if unknown:
        raise UserError(f"search.space.{unknown[0]} is not a searched knob; known: {', '.join(BY_NAME)}")
    missing = [name for name in BY_NAME if name not in space]
    if missing:
        raise UserError(f"search.space.{missing[0]} has no range; add it to the search config (toprovar/conf/search/)")
    for knob in KNOBS:
        value, where = space[knob.name], f"search.space.{knob.name}"
        if knob.kind == CATEGORICAL:
            chosen = list(value) if isinstance(value, (list, tuple)) else [value]
            if not chosen or any(c not in knob.limits for c in chosen) or len(set(chosen)) != len(chosen):
                raise UserError(
                    f"{where}={chosen} must be a non-empty list of distinct values from {list(knob.limits)}"
                )
            continue
        if value is None and knob.measured is not None:
            continue
        lo, hi = knob.limits
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(_number(v, knob.kind) for v in value)
            or not (lo <= value[0] <= value[1])
            or (hi is not None and value[1] > hi)
        ):
            kind = "integers" if knob.kind == INT else "numbers"
            bound = f"{lo} <= low <= high" + (f" <= {hi}" if hi is not None else "")
            null = "; null: measured" if knob.measured is not None else ""
            raise UserError(f"{where}={value} must be [low, high] {kind} with {bound}{null}")


@dataclass(frozen=True)
class SearchSpace:
    """The range (or the choices) of every knob; null ranges filled in from the pre-sampling summary."""

    ranges: Mapping[str, tuple]

    @classmethod
    def from_config(cls, space: Mapping[str, Any], summary: Any) -> SearchSpace:
        check_space(space)
        ranges = {}
        for knob in KNOBS:
            value = space[knob.name]
            if knob.kind == CATEGORICAL:
                ranges[knob.name] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
                continue
            measured = knob.measured(summary) if knob.measured is not None else None
            if knob.capped and value is not None and value[1] > measured[1]:
                raise UserError(
                    f"search.space.{knob.name}={list(value)} goes past {measured[1]} (measured for this backbone)"
                )
            found = tuple(knob.cast(v) for v in (measured if value is None else value))
            top = knob.ceiling(summary) if knob.ceiling is not None else None
            if top is not None and found[1] > top:
                found = (min(found[0], top), top)
            ranges[knob.name] = found
        return cls(ranges)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Every knob, one-value choices included, so a trial's params name its whole policy."""
        params: dict[str, Any] = {}
        for knob in KNOBS:
            found = self.ranges[knob.name]
            if knob.kind == CATEGORICAL:
                params[knob.name] = trial.suggest_categorical(knob.name, list(found))
            elif knob.kind == INT:
                params[knob.name] = trial.suggest_int(knob.name, *found, log=knob.log)
            else:
                params[knob.name] = trial.suggest_float(knob.name, *found, log=knob.log)
        return params

    def random_params(self, seed: int) -> Iterator[dict[str, Any]]:
        """Endless policies of the space drawn at random, seeded: Optuna's `RandomSampler` through
        `suggest` (uniform, log-uniform where the knob is log scale); the cost model's probe policies
        (calibrate.stages.presample)."""
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        while True:
            yield self.suggest(study.ask())

    def clip(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """`params` moved into the space (warm-starting with defaults outside a range); a choice the
        space does not offer becomes its first choice, a missing knob its low end."""
        out: dict[str, Any] = {}
        for knob in KNOBS:
            found = self.ranges[knob.name]
            if knob.kind == CATEGORICAL:
                out[knob.name] = params[knob.name] if params.get(knob.name) in found else found[0]
            elif knob.never is not None and knob.name in params and params[knob.name] is None:
                out[knob.name] = found[1]  # never: the top of the range is as close as the space gets
            else:
                value = knob.cast(params.get(knob.name, found[0]))
                out[knob.name] = min(max(value, found[0]), found[1])
        return out

    def as_dict(self) -> dict[str, list]:
        return {name: list(found) for name, found in self.ranges.items()}

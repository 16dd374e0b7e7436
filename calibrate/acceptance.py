"""Acceptance of a policy on held-out prompts: one-sided confidence bounds, decided sequentially.

Validation is paired: every held-out prompt is generated with the policy and unpruned, same
prompt and seed, and each quality metric becomes one number per prompt — the geneval-lite drop
(unpruned score − policy score, in [−1, 1]) and the SSIM of the policy's image against the
unpruned one. A `Criterion` per metric states the promise: the mean drop is at most a margin, or
the mean SSIM at least a floor (SSIM is handled as the drop 1 − SSIM against the margin
1 − floor, so one rule serves both). A policy is

* **accepted** when, for every criterion, the one-sided upper bound of the mean drop is ≤ its
  margin (for SSIM: the lower bound of the mean SSIM is ≥ the floor);
* **rejected** when some criterion's lower bound of the mean drop is > its margin;
* otherwise looked at again with the next batch of prompts; still open when the prompt budget is
  spent, it is **undecided**, which counts as not validated;
* with `futility`, stopped early as **futile** (not validated either) once the bound cannot be met
  within the budget unless the mean improves by more than one standard error: at look k < K, the
  bound of the last look (α_K, the whole budget) computed with the mean lowered by its standard
  error se_k and the spread seen so far (`projected_upper`) is past the margin for some criterion
  (for a floor, the mirror image). It only ever
  stops a validation without accepting, so the promise below is untouched (non-binding futility);
  it saves the prompts a policy near the margin would spend to end undecided (issue 25: the default
  run spent 2 × 384 held-out prompts on two such policies).

Repeated looks — alpha spending. The looks are planned: K = ceil(budget / batch), after n_k =
min(k · batch, budget) prompts. Look k spends α_k = A(n_k / budget) − A(n_{k−1} / budget) of the
error budget α = 1 − confidence, with the Lan–DeMets Pocock-type function A(t) = α·ln(1 + (e − 1)·t),
and its bounds hold at confidence 1 − α_k each. By the union bound over the looks,
P(some look accepts a policy whose true mean drop is above the margin) ≤ Σ α_k = α, whatever the
stopping (the same for false rejections on the other side). Acceptance needs every criterion to
pass, so a policy bad in any one metric is falsely accepted with probability ≤ α without a
multiplicity correction (intersection–union); rejection triggers on any metric, so it is not
corrected (a false rejection costs prompts, not a promise). Why Pocock-type spending: the issue
asks clear cases to stop after one batch; O'Brien–Fleming-type spending keeps nearly all α for the
last look (α_1 ≈ 7·10⁻⁴ at K = 3, α = 0.05), so the first look can decide almost nothing, while Pocock-type
spends α_1 ≈ 0.45·α at K = 3 and still keeps a usable α_k for the last look (≈ 0.24·α). Why not a
confidence sequence: no well-kept library provides one for bounded means (confseq: a 2023 source
release with a C++ build), and with a handful of planned looks alpha spending is tighter.

The bound at one look (`mean_bounds`) is the one-sided Student-t bound of the mean (the interval
of `scipy.stats.ttest_1samp`, quantile from `scipy.stats.t`), widened where needed for metrics
whose per-prompt drop can be a whole prompt (geneval-lite; `Criterion.whole_prompts`). Those
drops are mostly 0 with rare ±1 jumps, and the t bound alone undercovers badly there: with 2 % of
the prompts lost and none won, the sample often shows no loss at all and a zero variance, and the
sequential rule with t bounds accepted 37 % of such policies sitting at the margin (144 prompts in
three looks; tests/test_calibrate_acceptance.py, docs/calibration.md "Acceptance"). Their bound is
never tighter than the Wilson score bound at the observed mean clipped to [0, 1] (z from
`scipy.stats.norm`): the t bound with its variance floored at the Bernoulli variance δ(1 − δ) of a
mean made of whole-prompt losses, the score-interval remedy for rare events. It costs prompts:
with nothing lost, n prompts certify at best a drop of about z²/n, so a 0.02 margin needs ≥ ~215
prompts at the last of two looks at confidence 0.95 (z = 2.07). SSIM is continuous (per-image SD
0.013–0.020 for policies on tiny, far above its floor) and uses the t bound alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from calibrate.config import AcceptanceConfig

ACCEPT, REJECT, CONTINUE, UNDECIDED, FUTILE = "accept", "reject", "continue", "undecided", "futile"


@dataclass(frozen=True)
class Criterion:
    """One metric's promise: mean drop ≤ `margin` (or, with `floor`, mean value ≥ `margin`)."""

    metric: str
    margin: float
    floor: bool = False  # the metric is a value with a lower limit (SSIM), not a drop
    whole_prompts: bool = False  # a prompt's drop can be a whole prompt (binary-like): Wilson margin


@dataclass(frozen=True)
class MetricBound:
    """One criterion at one look, in the metric's own units (for a floor: bounds of the mean value)."""

    metric: str
    n: int
    mean: float
    lower: float
    upper: float
    margin: float
    floor: bool
    decision: str  # accept | reject | continue | futile (this metric alone)
    lost: int = 0  # prompts whose value got worse / better than unpruned
    won: int = 0

    def record(self) -> dict[str, float | int | str | bool]:
        return {
            "n": self.n,
            "mean": self.mean,
            "lower": self.lower,
            "upper": self.upper,
            "margin": self.margin,
            "kind": "floor" if self.floor else "max_drop",
            "decision": self.decision,
            "prompts_lost": self.lost,
            "prompts_won": self.won,
        }


@dataclass(frozen=True)
class Verdict:
    """The decision after one look and the bounds it rests on."""

    decision: str  # accept | reject | continue | futile; undecided once the budget is spent
    look: int  # 1-based
    looks: int  # planned looks K
    prompts: int  # prompts used so far
    budget: int
    confidence: float
    alpha_spent: float  # Σ α_k up to this look
    bounds: dict[str, MetricBound] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision == ACCEPT

    @property
    def final(self) -> bool:
        return self.decision != CONTINUE

    def metrics(self) -> dict[str, float]:
        """The numbers, flat (MLflow metrics); the decision itself is `decision` (a tag)."""
        out = {
            "confidence": self.confidence,
            "prompts_used": float(self.prompts),
            "look": float(self.look),
            "accepted": float(self.accepted),
        }
        for name, b in self.bounds.items():
            out.update({f"{name}.lower": b.lower, f"{name}.upper": b.upper, f"{name}.margin": b.margin})
        return out

    def record(self) -> dict:
        """Plain data for provenance."""
        return {
            "decision": self.decision,
            "confidence": self.confidence,
            "prompts_used": self.prompts,
            "prompt_budget": self.budget,
            "look": self.look,
            "looks_planned": self.looks,
            "alpha_spent": self.alpha_spent,
            "spending": "Lan-DeMets Pocock-type, union bound over looks",
            "metrics": {name: b.record() for name, b in self.bounds.items()},
        }


def spent(alpha: float, fraction: float) -> float:
    """Lan–DeMets Pocock-type spending function: α spent once `fraction` of the budget is used."""
    return alpha * math.log1p((math.e - 1.0) * min(max(fraction, 0.0), 1.0))


def mean_bounds(values: np.ndarray, alpha: float, whole_prompts: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One-sided lower and upper bounds of the mean of `values` over the last axis, each at
    confidence 1 − alpha (arrays of the leading shape; floats for 1-D input).

    The Student-t bound, mean ± t_{1−α, n−1}·s/√n (what `scipy.stats.ttest_1samp(values,
    alternative=...).confidence_interval(1 − alpha)` returns, vectorized). With `whole_prompts`
    (values in [−1, 1] that can jump by a whole prompt) each end is widened to at least the
    Wilson score bound at the observed mean (clipped to [0, 1]), z = Φ⁻¹(1 − α): the t bound
    with its variance floored at the Bernoulli variance of a mean made of whole-prompt changes
    (module docstring). Fewer than 2 values bound nothing: (−inf, inf).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    mean = values.mean(axis=-1)
    if n < 2:
        return np.full_like(mean, -np.inf)[()], np.full_like(mean, np.inf)[()]
    half = stats.t.ppf(1.0 - alpha, n - 1) * values.std(axis=-1, ddof=1) / math.sqrt(n)
    lower, upper = mean - half, mean + half
    if whole_prompts:
        wilson_low, wilson_high = _wilson(mean, n, alpha)
        lower, upper = np.minimum(lower, wilson_low), np.maximum(upper, wilson_high)
    return lower[()], upper[()]


def _wilson(mean: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Wilson score bounds at confidence 1 − alpha of a share observed as `mean` (clipped to [0, 1]) in n."""
    share = np.clip(mean, 0.0, 1.0)
    z = stats.norm.ppf(1.0 - alpha)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - spread, centre + spread


def projected_upper(drops: np.ndarray, alpha: float, budget: int, whole_prompts: bool = False) -> np.ndarray:
    """The upper bound the last look (α `alpha`, `budget` values) would give if the mean were one
    standard error lower than the `drops` seen so far and their spread stayed: the futility test."""
    drops = np.asarray(drops, dtype=np.float64)
    n = drops.shape[-1]
    sd = drops.std(axis=-1, ddof=1)
    hoped = drops.mean(axis=-1) - sd / math.sqrt(n)
    upper = hoped + stats.t.ppf(1.0 - alpha, budget - 1) * sd / math.sqrt(budget)
    if whole_prompts:
        upper = np.maximum(upper, _wilson(hoped, budget, alpha)[1])
    return upper


@dataclass(frozen=True)
class SequentialTest:
    """The planned looks and the rule; `decide` is called with all per-prompt drops seen so far."""

    criteria: tuple[Criterion, ...]
    confidence: float
    batch: int
    budget: int
    futility: bool = False  # stop a validation that cannot accept within the budget (module docstring)

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence {self.confidence} must lie in (0.5, 1)")
        if self.batch < 1 or self.budget < 1:
            raise ValueError(f"batch ({self.batch}) and budget ({self.budget}) must be >= 1")
        if not self.criteria:
            raise ValueError("no criterion to decide on")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def looks(self) -> int:
        return math.ceil(self.budget / self.batch)

    def sizes(self) -> list[int]:
        """Prompts used after each look: batch, 2·batch, ..., budget."""
        return [min(k * self.batch, self.budget) for k in range(1, self.looks + 1)]

    def futility_at(self, look: int) -> tuple[float, int] | None:
        """(α of the last look, budget) against which look `look` tests futility; None where it does
        not (futility off, or the last look, which decides undecided instead)."""
        return None if look == self.looks or not self.futility else (self.look_alpha(self.looks), self.budget)

    def look_alpha(self, look: int) -> float:
        """α_k spent at look `look` (1-based)."""
        sizes = [0, *self.sizes()]
        return spent(self.alpha, sizes[look] / self.budget) - spent(self.alpha, sizes[look - 1] / self.budget)

    def decide(self, drops: Mapping[str, np.ndarray], look: int) -> Verdict:
        """The verdict at `look` from each criterion's per-prompt values (drops; for a floor
        criterion the values themselves, e.g. SSIM per image), all of the same length."""
        if not 1 <= look <= self.looks:
            raise ValueError(f"look {look} outside 1..{self.looks}")
        values = {c.metric: np.asarray(drops[c.metric], dtype=np.float64) for c in self.criteria}
        sizes = {v.size for v in values.values()}
        if len(sizes) != 1:
            raise ValueError(f"criteria saw different prompt counts {sorted(sizes)}")
        alpha_k, last = self.look_alpha(look), look == self.looks
        futile_at = self.futility_at(look)
        bounds = {c.metric: _bound(c, values[c.metric], alpha_k, futile_at) for c in self.criteria}
        decision = _combine([b.decision for b in bounds.values()], last=last)
        return Verdict(
            str(decision),
            look,
            self.looks,
            sizes.pop(),
            self.budget,
            self.confidence,
            spent(self.alpha, self.sizes()[look - 1] / self.budget),
            bounds,
        )

    def simulate(self, drops: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run the whole rule on many synthetic validations at once: `drops[metric]` is
        `(R, budget)`; returns each row's final decision and the prompts it used. The same
        bounds and decisions as `decide`, vectorized over rows (for simulations and tests)."""
        rows = next(iter(drops.values())).shape[0]
        decision = np.full(rows, CONTINUE, dtype=object)
        used = np.zeros(rows, dtype=np.int64)
        for look, size in enumerate(self.sizes(), start=1):
            open_rows = decision == CONTINUE
            alpha_k, last = self.look_alpha(look), look == self.looks
            futile_at = self.futility_at(look)
            per_metric = [
                _decisions(c, np.asarray(drops[c.metric], dtype=np.float64)[open_rows, :size], alpha_k, futile_at)[0]
                for c in self.criteria
            ]
            decision[open_rows] = _combine(per_metric, last=last)
            used[open_rows] = size
        return decision.astype(str), used


def _decisions(criterion: Criterion, values: np.ndarray, alpha: float, futile_at: tuple[float, int] | None = None):
    """(decision per row, lower, upper) of one criterion; bounds in the metric's own units.
    `futile_at` = (α of the last look, budget): also decide futility (module docstring)."""
    drops = 1.0 - values if criterion.floor else values  # value >= floor  <=>  drop (1 - value) <= 1 - floor
    margin = 1.0 - criterion.margin if criterion.floor else criterion.margin
    low, high = mean_bounds(drops, alpha, criterion.whole_prompts)
    accept, reject = high <= margin, low > margin
    decision = np.where(accept, ACCEPT, np.where(reject, REJECT, CONTINUE))
    if futile_at is not None and drops.shape[-1] >= 2:
        projected = projected_upper(drops, *futile_at, criterion.whole_prompts)
        decision = np.where((decision == CONTINUE) & (projected > margin), FUTILE, decision)
    if criterion.floor:
        low, high = 1.0 - high, 1.0 - low
    return decision, low, high


def _combine(per_metric: list, last: bool):
    """Reject if any metric rejects, accept if all accept, futile if any is futile, else continue
    (undecided at the last look)."""
    stacked = np.asarray(per_metric, dtype=object).reshape(len(per_metric), -1)
    out = np.where(
        (stacked == REJECT).any(0),
        REJECT,
        np.where(
            (stacked == ACCEPT).all(0),
            ACCEPT,
            np.where((stacked == FUTILE).any(0), FUTILE, UNDECIDED if last else CONTINUE),
        ),
    )
    return out if np.ndim(per_metric[0]) else out[0]


def _bound(
    criterion: Criterion, values: np.ndarray, alpha: float, futile_at: tuple[float, int] | None = None
) -> MetricBound:
    decision, low, high = _decisions(criterion, values, alpha, futile_at)
    lost = won = 0
    if not criterion.floor:
        lost, won = int((values > 0).sum()), int((values < 0).sum())
    return MetricBound(
        criterion.metric,
        values.size,
        float(values.mean()),
        float(low),
        float(high),
        criterion.margin,
        criterion.floor,
        str(decision),
        lost,
        won,
    )


def sequential_test(cfg: AcceptanceConfig, budget: int, geneval: bool, clip: bool = False) -> SequentialTest:
    """The rule `search.acceptance` configures, over a budget of `budget` held-out prompts; the
    geneval-lite criterion only where the backbone has an evaluator (`geneval`), the CLIPScore one
    only with a CLIP model (`clip`, `quality.clip`). A CLIPScore drop is continuous (a prompt moves
    by a fraction of a point, not a whole prompt), so its bound is the t bound alone, as SSIM's."""
    criteria = [Criterion("ssim", cfg.min_ssim, floor=True)]
    if geneval:
        criteria.insert(0, Criterion("geneval_drop", cfg.max_geneval_drop, whole_prompts=True))
    if clip:
        criteria.append(Criterion("clip_drop", cfg.max_clip_drop))
    return SequentialTest(tuple(criteria), cfg.confidence, cfg.batch, budget, cfg.futility)

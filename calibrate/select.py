"""Pick the policy to ship: the fastest trial of the feasible front that held-out validation accepts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from calibrate.acceptance import REJECT
from calibrate.objective import Validation
from calibrate.search import feasible_front
from toprovar.errors import UserError

log = logging.getLogger(__name__)

Validate = Callable[[dict], Validation]  # trial params -> sequential held-out validation


@dataclass
class Selection:
    trial: FrozenTrial
    validation: Validation
    passed: bool  # held-out validation accepted it (calibrate.acceptance)
    tried: list[tuple[int, Validation]] = field(default_factory=list)


def first_probe(front: list[FrozenTrial], target: float | None) -> int | None:
    """The front trial to validate first: the slowest whose speedup reaches `target` (the trial
    most likely to hold among those fast enough); None without a target or when none reaches it."""
    reaching = [i for i, t in enumerate(front) if t.values[0] >= target] if target is not None else []
    return reaching[-1] if reaching else None


def next_probe(front: list[FrozenTrial], failed: int, passed: int) -> int | None:
    """Index of the next front trial to validate, strictly between the fastest known failure
    (`failed`, -1: none) and the fastest known pass (`passed`, len(front): none): the trial whose
    speedup is closest to the middle of the speedups at those bounds. None when none is left."""
    if passed - failed <= 1:
        return None
    upper = front[failed].values[0] if failed >= 0 else front[0].values[0]
    lower = front[passed].values[0] if passed < len(front) else front[-1].values[0]
    middle = (upper + lower) / 2
    return min(range(failed + 1, passed), key=lambda i: (abs(front[i].values[0] - middle), i))


def select_and_validate(
    study: optuna.Study, validate: Validate, candidates: int, target: float | None = None
) -> Selection:
    """Validate up to `candidates` trials of the feasible Pareto front; return the fastest accepted.

    Along the front (fastest first) SSIM rises as speedup falls, so the chance to hold on held-out
    prompts rises too: the probes bisect the front by speedup — after an acceptance the next probe
    is faster; after a rejection or an undecided validation (the prompt budget ran out before the
    bounds decided: not validated) slower — instead of validating the fastest few, which on `tiny`
    are often all too aggressive. With a `target` speedup the first probe is the slowest trial that
    reaches it (`first_probe`), so the first held-out prompts go to the policy most likely to ship
    at the target. Each validation is sequential (calibrate.acceptance): clear
    cases stop after one batch of prompts. When none is accepted, the probe that was not rejected
    (else any) with the best held-out SSIM is returned with `passed=False` (and a warning), so the
    calibration is never lost. Only trials faster than the unpruned model are candidates: a policy
    that slows generation down is nothing to ship (on the fast path a policy that prunes little
    pays its entropy probes and planned units without the savings: 0.81-0.89x measured for
    Infinity-2B on the H200).
    """
    feasible = feasible_front(study)
    if not feasible:
        done = [t for t in study.trials if t.values]
        best = max((t.values[1] for t in done), default=float("nan"))
        raise UserError(
            f"no trial met the search constraints (best SSIM {best:.3f}); "
            f"add trials (search.n_trials) or narrow search.space toward less pruning"
        )
    front = [t for t in feasible if t.values[0] > 1.0]
    if not front:
        raise UserError(
            f"no trial that met the search constraints is faster than the unpruned model (fastest: "
            f"{max(t.values[0] for t in feasible):.2f}x); add trials (search.n_trials) or relax "
            f"search.constraints"
        )
    tried: list[tuple[FrozenTrial, Validation]] = []
    failed, passed = -1, len(front)
    bar = tqdm(total=min(candidates, len(front)), desc="validate", unit="candidate", dynamic_ncols=True)
    while len(tried) < candidates:
        probe = first_probe(front, target) if not tried else None
        probe = next_probe(front, failed, passed) if probe is None else probe
        if probe is None:
            break
        trial = front[probe]
        result = validate(dict(trial.params))
        tried.append((trial, result))
        bar.update(1)
        verdict, scores = result.verdict, result.scores
        bounds = ", ".join(
            f"{name} [{b.lower:.3f}, {b.upper:.3f}] vs {b.margin:g}" for name, b in verdict.bounds.items()
        )
        log.info(
            "trial %d: %s after %d held-out prompts (speedup: %s; %d%% bounds: %s)",
            trial.number,
            verdict.decision,
            verdict.prompts,
            scores.speedups(),
            round(100 * verdict.confidence),
            bounds,
        )
        if verdict.accepted:
            passed = probe
        else:
            failed = probe
    bar.close()
    if passed < len(front):
        chosen = front[passed]
        return Selection(chosen, next(v for t, v in tried if t is chosen), True, [(t.number, v) for t, v in tried])
    trial, result = max(tried, key=lambda pair: (pair[1].verdict.decision != REJECT, pair[1].scores.ssim))
    log.warning(
        "held-out validation accepted none of the %d validated trials; exporting trial %d (%s, held-out "
        "SSIM %.3f) marked as not validated",
        len(tried),
        trial.number,
        result.verdict.decision,
        result.scores.ssim,
    )
    return Selection(trial, result, False, [(t.number, v) for t, v in tried])

"""Pick the policy to ship: the fastest feasible trial that also holds on held-out prompts."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from calibrate.config import ConstraintsConfig
from calibrate.objective import PolicyScorer
from calibrate.search import Scores, ranked_feasible, violations
from toprovar.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Selection:
    trial: FrozenTrial
    validation: Scores
    passed: bool                                   # the held-out scores meet the constraints too
    tried: list[tuple[int, Scores]] = field(default_factory=list)


def select_and_validate(study: optuna.Study, validator: PolicyScorer, limits: ConstraintsConfig,
                        candidates: int) -> Selection:
    """Validate the best `candidates` feasible trials (fastest first); return the first that holds.

    When none holds on the held-out prompts, the candidate with the best held-out SSIM is returned
    with `passed=False` (and a warning), so the calibration is never lost.
    """
    ranked = ranked_feasible(study)
    if not ranked:
        done = [t for t in study.trials if t.values]
        best = max((t.values[1] for t in done), default=float("nan"))
        raise UserError(f"no trial met the quality constraint (best SSIM {best:.3f} < {limits.min_ssim}); "
                        f"add trials (search.n_trials) or narrow search.space toward less pruning")
    tried: list[tuple[FrozenTrial, Scores]] = []
    for trial in tqdm(ranked[:candidates], desc="validate", unit="candidate", dynamic_ncols=True):
        scores = validator(dict(trial.params))
        tried.append((trial, scores))
        if all(v <= 0 for v in violations(scores, limits).values()):
            return Selection(trial, scores, True, [(t.number, s) for t, s in tried])
        log.info("trial %d fails on held-out prompts (speedup %.2f, SSIM %.3f); trying the next",
                 trial.number, scores.speedup, scores.ssim)
    trial, scores = max(tried, key=lambda pair: pair[1].ssim)
    log.warning("none of the %d best trials meets the constraints on held-out prompts; exporting trial %d "
                "(held-out SSIM %.3f) marked as not validated", len(tried), trial.number, scores.ssim)
    return Selection(trial, scores, False, [(t.number, s) for t, s in tried])

"""Selection: bisect the feasible Pareto front by speedup with held-out validations."""
from __future__ import annotations

import random

import optuna
import pytest

from calibrate.config import ConstraintsConfig
from calibrate.search import Scores, feasible_front
from calibrate.select import next_probe, select_and_validate

LIMITS = ConstraintsConfig(min_ssim=0.8, max_geneval_drop=0.01)


def _study(rows):
    """rows: (speedup, ssim, feasible on the search prompts); params name the row."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    dist = {"row": optuna.distributions.IntDistribution(0, 1000)}
    for i, (speedup, ssim, ok) in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(values=[speedup, ssim], params={"row": i}, distributions=dist,
                                                  constraints={"geneval_drop": -0.01 if ok else 0.05}))
    return study


class HeldOut:
    """Validation stand-in: a trial holds iff its speedup is at most `limit` (monotone along the front)."""

    def __init__(self, rows, limit):
        self.rows, self.limit, self.calls = rows, limit, []

    def __call__(self, params):
        speedup, ssim, _ = self.rows[params["row"]]
        self.calls.append(params["row"])
        return Scores(speedup=speedup, ssim=ssim - 0.01, geneval_drop=0.0 if speedup <= self.limit else 0.1)


def _front_rows(n):
    """n front trials with evenly spaced speedups in [1.1, 2.9] (SSIM rising as speedup falls)."""
    top = random.uniform(2.5, 2.9)
    return [(top - (top - 1.1) * i / max(1, n - 1), 0.90 + 0.09 * i / n, True) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 16])
def test_bisection_finds_the_fastest_front_trial_that_holds(n):
    rows = _front_rows(n) + [(1.05, 0.85, True), (3.5, 0.95, False)]  # a dominated and an infeasible trial
    limit = random.choice([r[0] for r in rows[:n]])
    held = HeldOut(rows, limit)
    chosen = select_and_validate(_study(rows), held, LIMITS, candidates=n)
    assert chosen.passed and rows[chosen.trial.params["row"]][0] == limit
    assert len(held.calls) <= n.bit_length()  # a bisection, not a scan
    assert set(held.calls) <= set(range(n))  # never the dominated or the infeasible trial
    assert [number for number, _ in chosen.tried] == held.calls


def test_budget_and_none_holding():
    rows = _front_rows(12)
    held = HeldOut(rows, limit=0.5)  # nothing holds
    chosen = select_and_validate(_study(rows), held, LIMITS, candidates=3)
    assert not chosen.passed and len(held.calls) == 3
    assert held.calls == sorted(held.calls)  # each failure sends the next probe to a slower trial
    assert chosen.validation.ssim == max(rows[i][1] for i in held.calls) - 0.01


def test_first_probe_is_near_the_middle_speedup():
    rows = [(3.0, 0.90, True), (2.9, 0.91, True), (2.2, 0.92, True), (1.9, 0.93, True), (1.0, 0.99, True)]
    front = feasible_front(_study(rows))
    assert [t.values[0] for t in front] == [3.0, 2.9, 2.2, 1.9, 1.0]
    assert next_probe(front, -1, len(front)) == 3  # the middle of 3.0 and 1.0 is 2.0: 1.9 is closest
    assert next_probe(front, 3, len(front)) == 4 and next_probe(front, 1, 3) == 2
    assert next_probe(front, 2, 3) is None

"""Selection: bisect the feasible Pareto front by speedup with held-out validations."""

from __future__ import annotations

import random

import optuna
import pytest

from calibrate.acceptance import ACCEPT, REJECT, UNDECIDED, Verdict
from calibrate.objective import Validation
from calibrate.search import Scores, feasible_front
from calibrate.select import next_probe, select_and_validate
from toprovar.errors import UserError


def _study(rows):
    """rows: (speedup, ssim, feasible on the search prompts); params name the row."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    dist = {"row": optuna.distributions.IntDistribution(0, 1000)}
    for i, (speedup, ssim, ok) in enumerate(rows):
        study.add_trial(
            optuna.trial.create_trial(
                values=[speedup, ssim],
                params={"row": i},
                distributions=dist,
                constraints={"geneval_drop": -0.01 if ok else 0.05},
            )
        )
    return study


class HeldOut:
    """Validation stand-in: a trial is accepted iff its speedup is at most `limit` (monotone along
    the front); above it, rejected or — as when the prompt budget runs out — undecided."""

    def __init__(self, rows, limit, above=REJECT):
        self.rows, self.limit, self.above, self.calls = rows, limit, above, []

    def __call__(self, params):
        speedup, ssim, _ = self.rows[params["row"]]
        self.calls.append(params["row"])
        decision = ACCEPT if speedup <= self.limit else self.above
        return Validation(
            Scores(speedup=speedup, ssim=ssim - 0.01, geneval_drop=0.0 if decision == ACCEPT else 0.1),
            Verdict(decision, 1, 1, 96, 96, 0.95, 0.05),
            {},
        )


def _front_rows(n):
    """n front trials with evenly spaced speedups in [1.1, 2.9] (SSIM rising as speedup falls)."""
    top = random.uniform(2.5, 2.9)
    return [(top - (top - 1.1) * i / max(1, n - 1), 0.90 + 0.09 * i / n, True) for i in range(n)]


@pytest.mark.parametrize("above", [REJECT, UNDECIDED])
@pytest.mark.parametrize("n", [1, 2, 5, 9, 16])
def test_bisection_finds_the_fastest_front_trial_that_holds(n, above):
    rows = _front_rows(n) + [(1.05, 0.85, True), (3.5, 0.95, False)]  # a dominated and an infeasible trial
    limit = random.choice([r[0] for r in rows[:n]])
    held = HeldOut(rows, limit, above)
    chosen = select_and_validate(_study(rows), held, candidates=n)
    assert chosen.passed and rows[chosen.trial.params["row"]][0] == limit
    assert len(held.calls) <= n.bit_length()  # a bisection, not a scan
    assert set(held.calls) <= set(range(n))  # never the dominated or the infeasible trial
    assert [number for number, _ in chosen.tried] == held.calls


def test_budget_and_none_holding():
    rows = _front_rows(12)
    held = HeldOut(rows, limit=0.5)  # nothing holds
    chosen = select_and_validate(_study(rows), held, candidates=3)
    assert not chosen.passed and len(held.calls) == 3
    assert held.calls == sorted(held.calls)  # each failure sends the next probe to a slower trial
    assert chosen.validation.scores.ssim == max(rows[i][1] for i in held.calls) - 0.01


def test_none_accepted_prefers_an_undecided_probe_over_a_rejected_one():
    rows = _front_rows(12)
    held = HeldOut(rows, limit=0.5)
    decisions = iter([UNDECIDED, REJECT, REJECT])  # the first (fastest) probe: undecided, lowest SSIM of the three

    def validate(params):
        result = held(params)
        return Validation(result.scores, Verdict(next(decisions), 3, 3, 288, 288, 0.95, 0.05), {})

    chosen = select_and_validate(_study(rows), validate, candidates=3)
    assert not chosen.passed and chosen.trial.params["row"] == held.calls[0]
    assert chosen.validation.verdict.decision == UNDECIDED


def test_first_probe_is_near_the_middle_speedup():
    rows = [(3.0, 0.90, True), (2.9, 0.91, True), (2.2, 0.92, True), (1.9, 0.93, True), (1.0, 0.99, True)]
    front = feasible_front(_study(rows))
    assert [t.values[0] for t in front] == [3.0, 2.9, 2.2, 1.9, 1.0]
    assert next_probe(front, -1, len(front)) == 3  # the middle of 3.0 and 1.0 is 2.0: 1.9 is closest
    assert next_probe(front, 3, len(front)) == 4 and next_probe(front, 1, 3) == 2
    assert next_probe(front, 2, 3) is None


def test_front_trials_slower_than_unpruned_are_never_candidates():
    """Measured on Infinity-2B: feasible trials that prune little run at 0.81-0.89x (entropy probes,
    planned units); the selection validates only faster ones and says so when there are none."""
    slow = [(random.uniform(0.7, 0.99), 0.96 + 0.01 * i, True) for i in range(3)]
    fast = _front_rows(4)
    rows = fast + slow
    held = HeldOut(rows, limit=0.0)  # nothing holds: the most accepted slow trial would otherwise win
    chosen = select_and_validate(_study(rows), held, candidates=8)
    assert not chosen.passed and set(held.calls) <= set(range(len(fast)))
    with pytest.raises(UserError, match="faster than the unpruned model"):
        select_and_validate(_study(slow), HeldOut(slow, limit=9.0), candidates=3)


@pytest.mark.parametrize("n", [3, 7, 12])
def test_a_target_speedup_is_validated_first_and_bisection_goes_on_from_it(n):
    rows = _front_rows(n)
    target = random.uniform(1.2, 2.4)
    reaching = [i for i, (speedup, _, _) in enumerate(rows) if speedup >= target]
    held = HeldOut(rows, limit=random.uniform(1.1, 2.9))
    chosen = select_and_validate(_study(rows), held, candidates=n, target=target)
    assert held.calls[0] == reaching[-1]  # the slowest trial at or above the target
    fastest_ok = min((i for i, (s, _, _) in enumerate(rows) if s <= held.limit), default=None)
    if fastest_ok is not None:
        assert chosen.passed and chosen.trial.params["row"] == fastest_ok
    # No front trial reaches the target: the plain bisection from the middle.
    plain, aimed = HeldOut(rows, held.limit), HeldOut(rows, held.limit)
    select_and_validate(_study(rows), plain, candidates=2)
    select_and_validate(_study(rows), aimed, candidates=2, target=10.0)
    assert aimed.calls == plain.calls

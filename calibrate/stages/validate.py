"""Stage 3, select and validate: bisect the feasible Pareto front, validating each probe on the
held-out prompts with the sequential acceptance test (calibrate.select, calibrate.acceptance)."""

from __future__ import annotations

from dataclasses import dataclass

from calibrate.acceptance import sequential_test
from calibrate.context import RunContext
from calibrate.knobs import PolicyFactory
from calibrate.objective import PolicyScorer
from calibrate.quality import geneval_scorer
from calibrate.search import hold_for_crash_test
from calibrate.select import Selection, select_and_validate


@dataclass(frozen=True)
class Validated:
    """The selected trial with its validation, and the held-out scorer (its unpruned reference is
    reused by the report's grid)."""

    selection: Selection
    validator: PolicyScorer


def run(ctx: RunContext, factory: PolicyFactory) -> Validated:
    hold_for_crash_test("validate")
    evaluator = geneval_scorer(ctx.backend.name)
    validator = ctx.scorer(ctx.prompts.validate, factory, evaluator, "validate", factory.summary)
    test = sequential_test(
        ctx.cfg.search.acceptance, len(ctx.prompts.validate), evaluator is not None, clip=ctx.clip is not None
    )
    selection = select_and_validate(
        ctx.study,
        lambda params: validator.validate(factory(params), test, "validate"),
        ctx.cfg.search.validate_candidates,
        ctx.cfg.search.target_speedup,
    )
    return Validated(selection, validator)

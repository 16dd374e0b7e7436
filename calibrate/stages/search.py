"""Stage 2, the search: this process's share of the Optuna trials (worker `worker`; the study counts
every worker's trials), each scored on the search prompts against their unpruned reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calibrate.context import RunContext
from calibrate.knobs import PolicyFactory, SearchSpace
from calibrate.objective import PolicyScorer
from calibrate.quality import geneval_scorer
from calibrate.search import run_search
from calibrate.workers import cpu_threads


def scorer(ctx: RunContext, factory: PolicyFactory | None) -> PolicyScorer:
    """The search prompts' scorer; `factory` may be set later (a worker measures the unpruned
    reference before the study has its pre-sampling summary)."""
    summary = None if factory is None else factory.summary
    return ctx.scorer(ctx.prompts.search, factory, geneval_scorer(ctx.backend.name), "search", summary)


def run(
    ctx: RunContext,
    space: SearchSpace,
    search_scorer: PolicyScorer,
    *,
    worker: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Run trials until the study has `search.n_trials` complete ones (or `search.timeout_s`);
    returns how many this process ran. N workers on the CPU share its cores."""
    cfg = ctx.cfg.search
    threads = cpu_threads(ctx.device, cfg.workers)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_search(
            ctx.study,
            space,
            search_scorer,
            n_trials=cfg.n_trials,
            limits=cfg.constraints,
            tracker=ctx.tracker,
            timeout_s=cfg.timeout_s,
            grace_s=ctx.cfg.storage.grace_period_s,
            worker=worker,
            progress=progress,
            should_stop=should_stop,
        )
    finally:
        torch.set_num_threads(before)

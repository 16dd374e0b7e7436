"""The evaluate stage (`stages=[evaluate] evaluate=[...]`): measure existing policies on every
held-out prompt with the validation code; a table with each policy's one-sided bounds and decision
at `search.acceptance` (one look: all prompts), and a grid of their images."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from calibrate import plots
from calibrate.acceptance import SequentialTest, sequential_test
from calibrate.config import CalibrationConfig
from calibrate.context import Output, RunContext
from calibrate.quality import geneval_scorer

log = logging.getLogger("calibrate")

SHOWN = (  # the table's columns in the log, where present
    "policy",
    "wall_speedup",
    "flop_speedup",
    "predicted_speedup",
    "ssim",
    "acceptance.ssim.lower",
    "geneval_drop",
    "acceptance.geneval_drop.upper",
    "prompts_lost",
    "prompts_won",
    "decision",
    "kept_share",
    "D_mean",
)


def check_policies(cfg: CalibrationConfig) -> list[tuple[str, Any]]:
    """`(name, Policy)` of each `evaluate` entry, checked against the schema and the backbone's
    schedule and depth (`toprovar.policy.load_policy` with its spec): one-line errors, no weights."""
    from toprovar.cli import generation_settings
    from toprovar.models.registry import get_backbone
    from toprovar.policy import load_policy

    spec, settings = get_backbone(str(cfg.backbone["name"])), generation_settings(cfg.backbone)
    return [
        (name, load_policy(name, spec, pixels=settings.get("pixels"), h_div_w=settings.get("h_div_w")))
        for name in cfg.evaluate
    ]


def run(ctx: RunContext, policies: list[tuple[str, Any]]) -> Output:
    """Measure `policies` (checked by `check_policies` before any weights loaded)."""
    import pandas as pd
    from tqdm.auto import tqdm

    evaluator = geneval_scorer(ctx.backend.name)
    acceptance = ctx.cfg.search.acceptance
    held_out = ctx.prompts.validate
    scorer = ctx.scorer(held_out, lambda params: params, evaluator, "evaluate")
    test: SequentialTest = sequential_test(acceptance, len(held_out), evaluator is not None, clip=ctx.clip is not None)
    test = dataclasses.replace(test, batch=test.budget)  # a measurement: every prompt, one look
    rows, images = [], [("unpruned", scorer.reference().images)]
    for name, policy in tqdm(policies, desc="evaluate", unit="policy", dynamic_ncols=True):
        result = scorer.validate(policy, test)
        metrics = {**result.scores.metrics(), **{f"acceptance.{k}": v for k, v in result.verdict.metrics().items()}}
        rows.append({"policy": name, **metrics, "decision": result.verdict.decision})
        images.append((str(name), result.scores.images))
        ctx.tracker.log.metrics(ctx.parent, {f"evaluate.{len(rows) - 1}.{k}": v for k, v in metrics.items()})
    frame = pd.DataFrame(rows)
    folder = ctx.run_dir / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "policies.csv", index=False)
    reference = scorer.reference()
    unpruned = f"{float(reference.scores[acceptance.score].mean()):.4f}" if reference.scores else "n/a"
    log.info(
        "%d policies on %d held-out prompts (unpruned geneval-lite %s %s; bounds one-sided at %g):\n%s",
        len(rows),
        len(held_out),
        acceptance.score,
        unpruned,
        acceptance.confidence,
        frame[[c for c in SHOWN if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4f}"),
    )
    with ctx.clock.section("pictures"):
        grid = plots.plot_policies_grid(images, held_out.texts, folder / "unpruned_vs_policies.png").path
    return Output([folder / "policies.csv", grid], {"evaluate_grid": (grid, 0)})

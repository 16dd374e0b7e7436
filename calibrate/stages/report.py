"""Stage 4, the report: the trials table and Pareto plot, the unpruned-vs-policy grids, the held-out
per-prompt table, and the selection's metrics and tags on the MLflow parent run."""

from __future__ import annotations

import json
from pathlib import Path

from calibrate import plots
from calibrate.context import Output, RunContext
from calibrate.knobs import PolicyFactory
from calibrate.objective import PolicyScorer
from calibrate.search import completed, pareto_front, trial_summary, trials_frame
from calibrate.select import Selection
from calibrate.stages.validate import Validated

# Held-out prompts shown in the validation grid: the first ones the validation used (all search
# prompts are shown in the search grid).
GRID_HELD_OUT = 16


def run(ctx: RunContext, validated: Validated, factory: PolicyFactory, search: PolicyScorer) -> dict[str, Output]:
    """Everything below, by MLflow artifact folder (search, grids, validation)."""
    selection = validated.selection
    outputs = {
        "search": search_tables(ctx, selection),
        "grids": grids(ctx, selection, factory, search, validated.validator),
        "validation": Output([paired_table(ctx, selection, validated.validator)]),
    }
    tracker, parent, verdict = ctx.tracker, ctx.parent, selection.validation.verdict
    tracker.log.metrics(parent, {f"validation.{k}": v for k, v in selection.validation.scores.metrics().items()})
    tracker.log.metrics(parent, {f"acceptance.{k}": v for k, v in verdict.metrics().items()})
    tracker.log.metrics(parent, {f"search.{k}": v for k, v in selection.trial.user_attrs.get("metrics", {}).items()})
    tracker.log.tags(
        parent,
        {"selected_trial": selection.trial.number, "validated": selection.passed, "acceptance": verdict.decision},
    )
    return outputs


def search_tables(ctx: RunContext, selection: Selection | None = None) -> Output:
    """search/: trials.csv and .parquet (with the constraints each trial missed), the Pareto front
    and its plot (marking the validated candidates and the selected trial)."""
    study = ctx.study
    folder = ctx.run_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study)
    # Which constraints each trial missed (Optuna's values: > 0 is a violation), for the plot.
    missed = {
        t.number: ",".join(k for k, v in (t.constraints or {}).items() if v > 0)
        for t in study.get_trials(deepcopy=False)
    }
    if len(frame):
        frame["violated"] = frame.number.map(missed).fillna("")
    frame.to_csv(folder / "trials.csv", index=False)
    frame.to_parquet(folder / "trials.parquet", index=False)
    front = pareto_front(study)
    (folder / "pareto_front.json").write_text(json.dumps([trial_summary(t) for t in front], indent=2))
    files = [folder / "trials.csv", folder / "trials.parquet", folder / "pareto_front.json"]
    validated = (
        []
        if selection is None
        else [
            {
                "number": number,
                # held-out: the measured wall clock where timed (the search point: the objective)
                "speedup": v.scores.speedup if v.scores.wall_speedup is None else v.scores.wall_speedup,
                "ssim": v.scores.ssim,
                "decision": v.verdict.decision,
            }
            for number, v in selection.tried
        ]
    )
    with ctx.clock.section("pictures"):
        plot = plots.plot_pareto(
            frame,
            [t.number for t in front],
            ctx.cfg.search.constraints.min_ssim,
            folder / "pareto.png",
            None if selection is None else selection.trial.number,
            validated,
        )
    files.append(plot.path)
    return Output(files, {"pareto": (plot.path, len(completed(study)))})


def grids(
    ctx: RunContext, selection: Selection, factory: PolicyFactory, search: PolicyScorer, validator: PolicyScorer
) -> Output:
    """Unpruned (top row) over the selected policy (bottom row), one column per prompt: every
    search prompt (generated again with the policy) and the first `GRID_HELD_OUT` held-out
    prompts the validation used (its own images); each policy image noted with its SSIM and
    score changes, framed red / green where its prompt was lost / won. Cells ≤ 256 px."""
    folder = ctx.run_dir / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    number = selection.trial.number
    run, ref, paired = search.run_paired(factory(selection.trial.params), desc="grid: search prompts")
    # Lost / won by the score acceptance bounds: geneval-lite where the backbone has it, else CLIPScore.
    mark_key = next((k for k in (f"geneval_drop.{ctx.cfg.search.acceptance.score}", "clip_drop") if k in paired), None)
    held_out = selection.validation
    shown = min(GRID_HELD_OUT, len(held_out.paired["ssim"]))
    files, pictures = [], {}
    with ctx.clock.section("pictures"):
        for name, unpruned, pruned, values, prompts, title in (
            (
                "search",
                ref.images,
                run.images,
                paired,
                search.prompts.texts,
                f"Search prompts (all {len(run)}), trial {number}",
            ),
            (
                "validate",
                validator.reference(shown).images,
                held_out.scores.images[:shown],
                {k: v[:shown] for k, v in held_out.paired.items()},
                validator.prompts.texts,
                f"Held-out prompts: the first {shown} of the {len(held_out.paired['ssim'])} validation used "
                f"({len(validator.prompts)} in the set), trial {number}, {held_out.verdict.decision}",
            ),
        ):
            layout = plots.plot_policy_grid(
                unpruned,
                pruned,
                prompts,
                values,
                folder / f"{name}_unpruned_vs_policy.png",
                title,
                policy_label=f"policy (trial {number})",
                mark_key=mark_key,
            )
            files.append(layout.path)
            pictures[f"grid_{name}"] = (layout.path, number)
    return Output(files, pictures)


def paired_table(ctx: RunContext, selection: Selection, validator: PolicyScorer) -> Path:
    """validation/per_prompt.csv: every probe's per-prompt paired values (what its bounds rest on)."""
    import pandas as pd

    frames = [
        pd.DataFrame(
            {
                "trial": number,
                "decision": result.verdict.decision,
                "prompt": range(len(result.paired["ssim"])),
                "seed": validator.prompts.seeds[: len(result.paired["ssim"])],
                **result.paired,
            }
        )
        for number, result in selection.tried
    ]
    path = ctx.run_dir / "validation" / "per_prompt.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path

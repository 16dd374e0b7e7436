"""Pictures of a calibration: Fig. 8 of the paper, layer-score heatmap, Pareto front, image grids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from toprovar.plots import GridLayout, draw_grid  # noqa: E402


def plot_entropy_and_rho(
    scales: pd.DataFrame, images: pd.DataFrame, tau_range: tuple[float, float], min_ssim: float, path: Path
) -> Path:
    """Fig. 8: mean entropy vs scale; ρ_s vs scale with the high-SSIM band and the τ range."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.errorbar(scales.scale, scales.mean_entropy, yerr=scales.mean_entropy_std, marker="o", capsize=3)
    left.set(xlabel="scale", ylabel="mean attention entropy (nats)", title="Mean entropy vs scale")
    right.errorbar(scales.scale, scales.rho_mean, yerr=scales.rho_std, marker="o", capsize=3, label="ρ_s (mean ± std)")
    band = images[images.in_band]
    if len(band):
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(band))
        right.scatter(
            band.scale + jitter, band.rho, s=12, alpha=0.6, color="tab:green", label=f"early exit SSIM ≥ {min_ssim:g}"
        )
    right.axhspan(*tau_range, color="tab:orange", alpha=0.15, label=f"τ range [{tau_range[0]:.2f}, {tau_range[1]:.2f}]")
    right.set(xlabel="scale", ylabel="low-entropy ratio ρ_s", title="ρ_s vs scale", ylim=(0, 1))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_heatmap(layers: pd.DataFrame, representative_scale: int, path: Path) -> Path:
    """log10 σ1/σ2 per (layer, scale); the representative scale is marked."""
    table = layers.pivot(index="layer", columns="scale", values="ratio_median")
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * table.shape[1], 1.5 + 0.25 * table.shape[0]))
    image = ax.imshow(np.log10(table.to_numpy()), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set(xlabel="scale", ylabel="layer", title="log10 σ1/σ2 of the entropy map (Global ↑, Detail ↓)")
    if representative_scale in table.columns:
        col = list(table.columns).index(representative_scale)
        ax.axvline(col, color="white", linestyle="--", linewidth=1)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# Marker per violated constraint (the first one listed wins when a trial violates several).
CONSTRAINT_MARKERS = {"ssim": "v", "geneval_drop": "X", "clip_drop": "s"}
DECISION_COLOURS = {"accept": "tab:green", "reject": "tab:red", "undecided": "tab:purple"}


@dataclass
class ParetoPlot:
    path: Path
    legend: list[str]  # the legend's entries, in order
    front: list[int]  # trial numbers joined as the feasible Pareto front


def plot_pareto(
    trials: pd.DataFrame,
    front: Sequence[int],
    min_ssim: float,
    path: Path,
    chosen: int | None = None,
    validated: Sequence[dict] = (),
) -> ParetoPlot:
    """Speedup vs SSIM of every complete trial: feasible ones filled, the feasible Pareto front
    (`front`, calibrate.search.pareto_front: feasible trials only) joined; infeasible ones hollow, with
    one marker per violated constraint (column `violated`: the names of the constraints > 0, comma
    separated); each validated candidate's held-out (speedup, SSIM) — `validated`: dicts with
    number, speedup, ssim, decision — joined to its search point by an arrow, coloured by decision."""
    done = trials[trials.state == "COMPLETE"] if len(trials) else trials
    fig, ax = plt.subplots(figsize=(7, 5))
    if len(done):
        feasible = done[done.feasible]
        other = done[~done.feasible]
        violated = other["violated"] if "violated" in other else pd.Series([""] * len(other), index=other.index)
        first = violated.fillna("").str.split(",").str[0]
        for name in sorted(set(first)):
            rows = other[first == name]
            ax.scatter(
                rows["metric.speedup"],
                rows["metric.ssim"],
                facecolors="none",
                edgecolors="grey",
                marker=CONSTRAINT_MARKERS.get(name, "o"),
                label=f"infeasible: {name or 'constraint'} ({len(rows)})",
            )
        ax.scatter(
            feasible["metric.speedup"], feasible["metric.ssim"], color="tab:blue", label=f"feasible ({len(feasible)})"
        )
        pts = done[done.number.isin(front)].sort_values("metric.speedup")
        ax.plot(
            pts["metric.speedup"],
            pts["metric.ssim"],
            color="tab:red",
            linewidth=1,
            label="Pareto front of feasible trials",
        )
        search_points = done.set_index("number")
        for decision, colour in DECISION_COLOURS.items():
            held = [v for v in validated if v["decision"] == decision and v["number"] in search_points.index]
            if not held:
                continue
            ax.scatter(
                [v["speedup"] for v in held],
                [v["ssim"] for v in held],
                marker="D",
                s=40,
                color=colour,
                edgecolors="black",
                zorder=4,
                label=f"held-out: {decision} ({len(held)})",
            )
            for v in held:
                start = search_points.loc[v["number"]]
                ax.annotate(
                    "",
                    xy=(v["speedup"], v["ssim"]),
                    xytext=(start["metric.speedup"], start["metric.ssim"]),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8},
                )
                ax.annotate(
                    str(v["number"]), (v["speedup"], v["ssim"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        if chosen is not None and chosen in set(done.number):
            row = done[done.number == chosen].iloc[0]
            ax.scatter(
                [row["metric.speedup"]],
                [row["metric.ssim"]],
                marker="*",
                s=200,
                color="gold",
                edgecolors="black",
                label=f"selected (trial {chosen}, search)",
                zorder=5,
            )
    ax.axhline(min_ssim, color="tab:orange", linestyle="--", linewidth=1, label=f"SSIM ≥ {min_ssim:g}")
    ax.set(
        xlabel="speedup (search: the objective; arrow heads: held-out wall clock)",
        ylabel="mean SSIM vs unpruned",
        title="Search: speedup vs quality (arrows: held-out)",
    )
    ax.legend(fontsize=7, loc="best")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ParetoPlot(path, legend, [int(n) for n in front])


def _cell_note(paired: dict[str, np.ndarray], i: int, mark_key: str | None) -> tuple[str, str | None]:
    """Text under a policy cell (SSIM; the change of every evaluator score), one line each so that
    columns of 128 px do not run into each other, and its mark: 'lost' / 'won' by the sign of
    `paired[mark_key]` (a drop: unpruned − policy), None without one."""
    parts = [f"SSIM {paired['ssim'][i]:.3f}"]
    for key in sorted(k for k in paired if k != "ssim"):
        name = "CLIP" if key == "clip_drop" else key.split(".", 1)[-1]
        parts.append(f"{name} {0.0 - float(paired[key][i]):+.2f}")  # 0.0 - x: no "-0.00"
    drop = float(paired[mark_key][i]) if mark_key in paired else 0.0
    return "\n".join(parts), ("lost" if drop > 0 else "won") if drop != 0 else None


def plot_policy_grid(
    unpruned: torch.Tensor,
    policy: torch.Tensor,
    prompts: Sequence[str],
    paired: dict[str, np.ndarray],
    path: Path,
    title: str,
    policy_label: str = "policy",
    mark_key: str | None = None,
) -> GridLayout:
    """Unpruned (top row) over the policy (bottom row), one column per prompt; under each policy
    image its SSIM and score changes against the unpruned image; its frame red when the prompt was
    lost and green when won by `paired[mark_key]` (the drop acceptance bounds: geneval-lite on
    tiny, CLIPScore with quality.clip; no frames without one)."""
    n = policy.shape[0]
    notes, marks = zip(*(_cell_note(paired, i, mark_key) for i in range(n))) if n else ((), ())
    name = "CLIPScore" if mark_key == "clip_drop" else (mark_key or "").split(".", 1)[-1]
    legend = f" — frames: red = prompt lost, green = won ({name} vs unpruned)" if mark_key in paired else ""
    return draw_grid(
        [list(unpruned[:n]), list(policy)],
        ["unpruned", policy_label],
        list(prompts[:n]),
        path,
        notes=[[""] * n, list(notes)],
        marks=[[None] * n, list(marks)],
        title=title + legend,
    )


def plot_early_exits(
    exit_images: dict[int, torch.Tensor],
    full: torch.Tensor,
    schedule: Sequence[tuple[int, int]],
    exit_ssim: np.ndarray,
    prompts: Sequence[str],
    path: Path,
    max_prompts: int = 8,
    cell_px: int = 160,
) -> GridLayout:
    """One row per early exit (refinement stopped after scale s, its grid h×w) and the full image,
    one column per prompt (the first `max_prompts`), each exit's SSIM against the full image noted.
    Cells of at most 160 px: 13 rows × 8 prompts at 1024² stay under ~8 MB of PNG."""
    n = min(max_prompts, full.shape[0])
    stops = sorted(exit_images)
    rows = [list(exit_images[s][:n]) for s in stops] + [list(full[:n])]
    labels = [f"exit after scale {s} ({schedule[s][0]}×{schedule[s][1]})" for s in stops]
    labels.append(f"full ({len(schedule)} scales)")
    notes = [[f"SSIM {exit_ssim[i, s]:.3f}" for i in range(n)] for s in stops] + [[""] * n]
    return draw_grid(
        rows,
        labels,
        list(prompts[:n]),
        path,
        notes=notes,
        cell_px=cell_px,
        title=f"Early exits vs the full image ({n} of {full.shape[0]} pre-sampling prompts)",
    )


def plot_policies_grid(
    rows: Sequence[tuple[str, torch.Tensor]], prompts: Sequence[str], path: Path, max_prompts: int = 8
) -> GridLayout:
    """One row per policy (the first the unpruned images), one column per prompt (the first `max_prompts`)."""
    n = min([max_prompts] + [images.shape[0] for _, images in rows])
    return draw_grid(
        [list(images[:n]) for _, images in rows],
        [label for label, _ in rows],
        list(prompts[:n]),
        path,
        title=f"Held-out prompts: the first {n}",
    )

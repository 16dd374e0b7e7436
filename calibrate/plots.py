"""Pictures of a calibration: Fig. 8 of the paper, layer-score heatmap, Pareto front, image grids."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def plot_entropy_and_rho(scales: pd.DataFrame, images: pd.DataFrame, tau_range: tuple[float, float],
                         min_ssim: float, path: Path) -> Path:
    """Fig. 8: mean entropy vs scale; ρ_s vs scale with the high-SSIM band and the τ range."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.errorbar(scales.scale, scales.mean_entropy, yerr=scales.mean_entropy_std, marker="o", capsize=3)
    left.set(xlabel="scale", ylabel="mean attention entropy (nats)", title="Mean entropy vs scale")
    right.errorbar(scales.scale, scales.rho_mean, yerr=scales.rho_std, marker="o", capsize=3, label="ρ_s (mean ± std)")
    band = images[images.in_band]
    if len(band):
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(band))
        right.scatter(band.scale + jitter, band.rho, s=12, alpha=0.6, color="tab:green",
                      label=f"early exit SSIM ≥ {min_ssim:g}")
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


def plot_pareto(trials: pd.DataFrame, front: Sequence[int], min_ssim: float, path: Path,
                chosen: int | None = None) -> Path:
    """Speedup vs SSIM of every complete trial; feasible ones filled, the trials numbered in `front`
    (the feasible Pareto front, calibrate.search.pareto_front) joined."""
    done = trials[trials.state == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(done):
        feasible = done[done.feasible]
        other = done[~done.feasible]
        ax.scatter(other["metric.speedup"], other["metric.ssim"], facecolors="none", edgecolors="grey", label="infeasible")
        ax.scatter(feasible["metric.speedup"], feasible["metric.ssim"], color="tab:blue", label="feasible")
        pts = done[done.number.isin(front)].sort_values("metric.speedup")
        ax.plot(pts["metric.speedup"], pts["metric.ssim"], color="tab:red", linewidth=1, label="feasible Pareto front")
        if chosen is not None and chosen in set(done.number):
            row = done[done.number == chosen].iloc[0]
            ax.scatter([row["metric.speedup"]], [row["metric.ssim"]], marker="*", s=200, color="gold",
                       edgecolors="black", label=f"selected (trial {chosen})", zorder=5)
    ax.axhline(min_ssim, color="tab:orange", linestyle="--", linewidth=1, label=f"SSIM ≥ {min_ssim:g}")
    ax.set(xlabel="speedup", ylabel="mean SSIM vs unpruned", title="Search: speedup vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_image_grid(rows: Sequence[torch.Tensor], path: Path, max_images: int = 8) -> Path:
    """Rows of uint8 `(N, H, W, 3)` images (e.g. unpruned over pruned) tiled into one PNG."""
    columns = min(max_images, min(r.shape[0] for r in rows))
    zoom = max(1, -(-128 // rows[0].shape[1]))                    # small images: nearest-neighbour up to >= 128 px
    rows = [r[:columns].repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2) for r in rows]
    tiles = [torch.cat(list(r), dim=1) for r in rows]             # each (H, W*columns, 3)
    Image.fromarray(torch.cat(tiles, dim=0).numpy()).save(path)
    return path

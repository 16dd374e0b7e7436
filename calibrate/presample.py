"""Pre-sampling: unpruned generations with entropy recording, and what calibration reads off them.

For every pre-sampling prompt: the full image with every block's attention entropy, and the image
of each early exit (refinement stopped after scale s). From these:

* per scale: mean entropy, ρ_s (mean and spread over prompts), SSIM of the early exit vs the full
  image — the two panels of the paper's Fig. 8. ρ_s is computed as the runtime computes it (from
  the token entropies of the first `probe_layers` blocks, which the ToProVAR pruner uses to decide
  D); the paper's all-layer mean is in the tables too (`rho_all_layers`);
* per (layer, scale): σ1/σ2 of the entropy map — the static Global/Detail layer ratios are the
  per-layer medians at the representative scale;
* the ρ_s crossing direction (the sign of the ρ_s trend over scales) and a τ range: the ρ_s values
  of early exits whose SSIM already meets the quality target (the "high-SSIM band").

ρ_s depends on how many probe layers it is read from, and the search varies that count
(`token.protect_layers`). The summary's τ range is measured at the policy's default count (the
one the shipped policies were calibrated with: measuring it at another would move the searched τ
range and so every calibrated policy); ρ_s at every other count the search may pick is recorded
beside it (`rho_probe_<k>` columns, `presample_probe_layers.json` with the τ range each count
gives), so a search that protects more layers is not tuned blind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from calibrate.backend import CalibrationBackend
from calibrate.probes import EntropyRecorder, entropy_stack
from calibrate.prompts import PromptSet
from calibrate.quality import ssim_per_image
from calibrate.stats import (
    crossing_direction,
    low_entropy_ratio,
    principal_component_ratio,
    quantile_range,
    representative_scale,
)
from toprovar.policy import TokenStage
from toprovar.pruning.fixed_exit import FixedExitPruner

log = logging.getLogger(__name__)

FALLBACK_TAU_RANGE = (0.2, 0.6)
TAU_QUANTILES = (0.1, 0.9)
TAU_PAD = 0.05


@dataclass(frozen=True)
class PresampleSummary:
    """What search and export take from pre-sampling (JSON-able; stored in the study too)."""

    crossing: str  # 'below' | 'above'
    tau_range: tuple[float, float]
    representative_scale: int
    layer_ratios: list[float]  # σ1/σ2 per layer at the representative scale (median over prompts)
    band_points: int  # (prompt, scale) pairs in the high-SSIM band
    prompts: int
    scales: int
    guided: bool = True  # the backbone runs classifier-free guidance (2B transformer rows)
    cost_model: dict | None = None  # the search's CPU cost model (calibrate.cost_model), None: not used

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PresampleSummary:
        data = dict(data)
        data["tau_range"] = tuple(data["tau_range"])
        return cls(**data)


@dataclass
class PresampleResult:
    summary: PresampleSummary
    scales: pd.DataFrame  # one row per scale
    images: pd.DataFrame  # one row per (prompt, scale)
    layers: pd.DataFrame  # one row per (layer, scale) with a map of >= 2×2 tokens
    full_images: torch.Tensor  # (N, H, W, 3) uint8, unpruned
    exit_images: dict[int, torch.Tensor]
    # Other probe-layer counts the search may pick -> {"tau_range", "crossing"} measured at that count.
    probe_layers: dict[int, dict] = field(default_factory=dict)
    traces: list = field(default_factory=list)  # every timed call (cost-model fitting data)


def _record(backend: CalibrationBackend, prompts: PromptSet):
    gen = backend.generate(
        prompts.texts, prompts.seeds, pruner_factory=EntropyRecorder, desc="presample: full + entropy"
    )
    chunks = [(p.collect(), real) for p, real in zip(gen.pruners, gen.chunks)]  # padded copies dropped
    maps = {key: torch.cat([c[key][:real] for c, real in chunks]) for key in chunks[0][0]}
    return gen, maps


def run_presample(
    backend: CalibrationBackend,
    prompts: PromptSet,
    min_ssim: float,
    probe_layers: int = TokenStage.protect_layers,
    other_probe_layers: Sequence[int] = (),
) -> PresampleResult:
    """Pre-sample `prompts`; the summary's ρ_s and τ range at `probe_layers`, and ρ_s with its τ
    range at each of `other_probe_layers` recorded beside them (counts not below the depth left out)."""
    full, maps = _record(backend, prompts)
    schedule = full.traces[0].schedule
    grids = [(h, w) for _, h, w in schedule]
    n_scales, depth, n = len(grids), backend.depth, len(prompts)
    others = sorted({k for k in other_probe_layers if k != probe_layers and 1 <= k < depth})

    exit_images: dict[int, torch.Tensor] = {}
    exit_ssim = np.ones((n, n_scales))
    traces = list(full.traces)
    for stop in tqdm(range(1, n_scales), desc="presample: early exits", unit="scale", dynamic_ncols=True):
        gen = backend.generate(prompts.texts, prompts.seeds, pruner_factory=partial(FixedExitPruner, stop - 1))
        traces.extend(gen.traces)
        exit_images[stop - 1] = gen.images
        exit_ssim[:, stop - 1] = ssim_per_image(gen.images, full.images, backend.device).numpy()

    mean_entropy = np.zeros((n, n_scales))
    rho = np.zeros((n, n_scales))
    rho_all = np.zeros((n, n_scales))
    rho_other = {k: np.zeros((n, n_scales)) for k in others}
    layer_rows = []
    for si, (h, w) in enumerate(grids):
        stack = entropy_stack(maps, si, depth)  # (N, layers, tokens)
        mean_entropy[:, si] = stack.mean(dim=(1, 2)).numpy()
        rho[:, si] = low_entropy_ratio(stack[:, :probe_layers]).numpy()
        rho_all[:, si] = low_entropy_ratio(stack).numpy()
        for k, values in rho_other.items():
            values[:, si] = low_entropy_ratio(stack[:, :k]).numpy()
        if min(h, w) >= 2:
            ratios = principal_component_ratio(stack, h, w).numpy()  # (N, layers)
            for li in range(depth):
                layer_rows.append(
                    {
                        "layer": li,
                        "scale": si,
                        "ratio_median": float(np.median(ratios[:, li])),
                        "ratio_mean": float(ratios[:, li].mean()),
                        "ratio_std": float(ratios[:, li].std()),
                    }
                )
    layers = pd.DataFrame(layer_rows)

    rep = representative_scale(grids)
    rep_rows = layers[layers.scale == rep].sort_values("layer")
    images = pd.DataFrame(
        [
            {
                "prompt": i,
                "seed": prompts.seeds[i],
                "scale": si,
                "mean_entropy": mean_entropy[i, si],
                "rho": rho[i, si],
                "rho_all_layers": rho_all[i, si],
                "exit_ssim": exit_ssim[i, si],
                **{f"rho_probe_{k}": values[i, si] for k, values in rho_other.items()},
            }
            for i in range(n)
            for si in range(n_scales)
        ]
    )
    scales = pd.DataFrame(
        {
            "scale": range(n_scales),
            "h": [g[0] for g in grids],
            "w": [g[1] for g in grids],
            "tokens": [g[0] * g[1] for g in grids],
            "mean_entropy": mean_entropy.mean(0),
            "mean_entropy_std": mean_entropy.std(0),
            "rho_mean": rho.mean(0),
            "rho_std": rho.std(0),
            "rho_all_layers_mean": rho_all.mean(0),
            "rho_all_layers_std": rho_all.std(0),
            "exit_ssim_mean": exit_ssim.mean(0),
            "exit_ssim_std": exit_ssim.std(0),
            **{f"rho_probe_{k}_{stat}": getattr(v, stat)(0) for k, v in rho_other.items() for stat in ("mean", "std")},
        }
    )

    # High-SSIM band: (prompt, scale) whose early exit already meets the target; scale 0 (one token)
    # and the full image are left out (ρ of one token and SSIM of the image itself say nothing).
    band = images[(images.scale >= 1) & (images.scale < n_scales - 1) & (images.exit_ssim >= min_ssim)]
    images["in_band"] = images.index.isin(band.index)
    tau_range = quantile_range(band.rho.to_numpy(), *TAU_QUANTILES, TAU_PAD)
    if tau_range is None:
        late = images[images.scale >= max(1, n_scales - 3)].rho.to_numpy()
        tau_range = quantile_range(late, *TAU_QUANTILES, TAU_PAD) or FALLBACK_TAU_RANGE
        log.warning("no early exit reached SSIM %.2f; τ range taken from the last scales' ρ_s: %s", min_ssim, tau_range)
    trend = scales[scales.scale >= 1]
    by_probe = {k: _measured_at(k, band, trend) for k in others}
    for k, measured in by_probe.items():
        log.info("ρ_s at %d probe layers: crossing %s, τ range %s", k, measured["crossing"], measured["tau_range"])
    summary = PresampleSummary(
        crossing=crossing_direction(trend.scale.to_numpy(), trend.rho_mean.to_numpy()),
        tau_range=(round(tau_range[0], 4), round(tau_range[1], 4)),
        representative_scale=rep,
        layer_ratios=[round(float(r), 6) for r in rep_rows.ratio_median],
        band_points=int(len(band)),
        prompts=n,
        scales=n_scales,
        guided=full.traces[0].rows > full.traces[0].batch,
    )
    return PresampleResult(summary, scales, images, layers, full.images, exit_images, by_probe, traces)


def _measured_at(k: int, band: pd.DataFrame, trend: pd.DataFrame) -> dict:
    """The τ range (None: no point in the high-SSIM band) and crossing of ρ_s read from `k` probe layers."""
    found = quantile_range(band[f"rho_probe_{k}"].to_numpy(), *TAU_QUANTILES, TAU_PAD)
    return {
        "tau_range": None if found is None else [round(v, 4) for v in found],
        "crossing": crossing_direction(trend.scale.to_numpy(), trend[f"rho_probe_{k}_mean"].to_numpy()),
    }


def write_tables(result: PresampleResult, folder: Path) -> list[Path]:
    """Parquet + CSV of each table and the summary JSON; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in (("scales", result.scales), ("images", result.images), ("layers", result.layers)):
        for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv)):
            path = folder / f"presample_{name}{suffix}"
            write(path, index=False)
            written.append(path)
    path = folder / "presample_summary.json"
    path.write_text(json.dumps(result.summary.to_json(), indent=2))
    written.append(path)
    if result.probe_layers:
        path = folder / "presample_probe_layers.json"
        path.write_text(json.dumps({str(k): v for k, v in result.probe_layers.items()}, indent=2))
        written.append(path)
    return written

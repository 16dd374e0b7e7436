"""Pre-sampling statistics (toprovar-method.md), on top of the runtime's stage math.

ρ_s (Eq. 3): share of tokens whose layer-mean entropy is below the scale's mean.
ϱ^(l,s) = σ1/σ2 of the h×w entropy map of layer l at scale s (Sec. 4, layer level).
R^(l,s) = exp(-β(ϱ - 1)) (Eq. 4): → 0 for Global layers, → 1 for Detail layers.
The formulas are `toprovar.pruning.stages`, so calibration measures what the runtime decides on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from toprovar.pruning import stages


def low_entropy_ratio(layer_entropy: Tensor) -> Tensor:
    """ρ_s per image from `(B, layers, tokens)` entropies: the layer mean of each token, then Eq. 3."""
    return stages.low_entropy_ratio(layer_entropy.float().mean(dim=1))


def principal_component_ratio(maps: Tensor, h: int, w: int) -> Tensor:
    """σ1/σ2 of each `(h, w)` entropy map; `maps` is `(..., h*w)`. Needs min(h, w) >= 2."""
    if min(h, w) < 2:
        raise ValueError(f"σ1/σ2 needs a map of at least 2×2 tokens, got {h}×{w}")
    return stages.principal_ratio(maps.float().reshape(*maps.shape[:-1], h, w))


def layer_score(ratio: float | np.ndarray, beta: float) -> np.ndarray:
    """R = exp(-β(ϱ - 1)) (Eq. 4), as the runtime computes it."""
    return stages.layer_score(torch.as_tensor(np.asarray(ratio, dtype=np.float64)), beta).numpy()


def crossing_direction(scales: np.ndarray, rho: np.ndarray) -> str:
    """'below' when ρ_s falls with the scale (D = min{s | ρ_s <= τ}), else 'above'."""
    slope = np.polyfit(np.asarray(scales, dtype=np.float64), np.asarray(rho, dtype=np.float64), 1)[0]
    return "below" if slope < 0 else "above"


def representative_scale(grids: list[tuple[int, int]]) -> int:
    """The paper's choice (scale 6 of 13 at 1M) at the same relative depth, with a >= 2×2 grid."""
    index = int(round((len(grids) - 1) * 6 / 12))
    while index < len(grids) - 1 and min(grids[index]) < 2:
        index += 1
    return index


def quantile_range(values: np.ndarray, low_q: float, high_q: float, pad: float) -> tuple[float, float] | None:
    """[q_low - pad, q_high + pad] ∩ [0, 1]; None without finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.quantile(values, [low_q, high_q])
    lo, hi = max(0.0, float(lo) - pad), min(1.0, float(hi) + pad)
    return (lo, hi) if hi > lo else (max(0.0, lo - pad), min(1.0, hi + pad))

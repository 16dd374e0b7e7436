"""Pre-sampling statistics of the paper (docs: shared/reference/toprovar-method.md).

ρ_s (Eq. 3): share of tokens whose layer-mean entropy is below the scale's mean.
ϱ^(l,s) = σ1/σ2 of the h×w entropy map of layer l at scale s (Sec. 4, layer level).
R^(l,s) = exp(-β(ϱ - 1)) (Eq. 4): → 0 for Global layers, → 1 for Detail layers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

_EPS = 1e-12


def low_entropy_ratio(layer_entropy: Tensor) -> Tensor:
    """ρ_s per image from `(B, layers, tokens)` entropies: mean over layers, then share below the mean."""
    per_token = layer_entropy.float().mean(dim=1)                     # H_i^s, (B, N)
    return (per_token < per_token.mean(dim=1, keepdim=True)).float().mean(dim=1)


def principal_component_ratio(maps: Tensor, h: int, w: int) -> Tensor:
    """σ1/σ2 of each `(h, w)` entropy map; `maps` is `(..., h*w)`. Needs min(h, w) >= 2."""
    if min(h, w) < 2:
        raise ValueError(f"σ1/σ2 needs a map of at least 2×2 tokens, got {h}×{w}")
    sv = torch.linalg.svdvals(maps.float().reshape(*maps.shape[:-1], h, w))
    return sv[..., 0] / sv[..., 1].clamp_min(_EPS)


def layer_score(ratio: float | np.ndarray, beta: float) -> float | np.ndarray:
    """R = exp(-β(ϱ - 1)) (Eq. 4)."""
    return np.exp(-beta * (np.asarray(ratio, dtype=np.float64) - 1.0))


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


def finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None

"""The three decision stages of ToProVAR as pure tensor functions (method: toprovar-method.md).

All inputs are per-token entropies already averaged over heads (and probe layers) for the
conditional rows: `H` of shape (B, N) for B images and N tokens of one scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def low_entropy_ratio(H: Tensor) -> Tensor:
    """ρ_s (Eq. 3): share of tokens whose entropy is below the scale's mean, per image -> (B,)."""
    return (H < H.mean(dim=-1, keepdim=True)).float().mean(dim=-1)


def crosses(rho: float, tau: float, crossing: str) -> bool:
    """Whether ρ_s crosses τ in the policy's direction (below: ρ ≤ τ, above: ρ ≥ τ)."""
    return rho <= tau if crossing == "below" else rho >= tau


def principal_ratio(entropy_map: Tensor, eps: float = 1e-12) -> Tensor:
    """ϱ = σ1/σ2 of each (h, w) entropy map in a (B, h, w) batch -> (B,). inf when rank ≤ 1."""
    if min(entropy_map.shape[-2:]) < 2:
        return torch.full(entropy_map.shape[:-2], math.inf, device=entropy_map.device)
    s = torch.linalg.svdvals(entropy_map.float())
    return s[..., 0] / s[..., 1].clamp_min(eps)


def layer_score(ratio: Tensor, beta: float) -> Tensor:
    """R = exp(-β(ϱ - 1)) (Eq. 4): → 1 for Detail layers (ϱ ≈ 1), → 0 for Global layers."""
    return torch.exp(-beta * (ratio - 1.0).clamp_min(0.0))


def normalize_entropy(H: Tensor, mode: str) -> Tensor:
    """Ĥ (Eq. 5). mean: N·H/ΣH (mean 1, default); sum: H/ΣH (paper as written); rank: rank/(N-1)."""
    n = H.shape[-1]
    if mode == "sum":
        return H / H.sum(-1, keepdim=True).clamp_min(1e-12)
    if mode == "mean":
        return H * n / H.sum(-1, keepdim=True).clamp_min(1e-12)
    ranks = torch.argsort(torch.argsort(H, dim=-1, stable=True), dim=-1, stable=True).float()
    return ranks / max(n - 1, 1)


def keep_probability(H_hat: Tensor, R: Tensor, phi: float, alpha_min: float, alpha_max: float) -> Tensor:
    """P_keep (Eq. 6) for s ≥ D: 1 - clip(α_min + (α_max-α_min)·q, 0, 1), q = clip(φ·R·Ĥ, 0, 1).

    H_hat (B, N), R (L,) -> (L, B, N).
    """
    q = (phi * R[:, None, None] * H_hat[None]).clamp(0.0, 1.0)
    return 1.0 - (alpha_min + (alpha_max - alpha_min) * q).clamp(0.0, 1.0)


def keep_counts(p_keep: Tensor, min_keep: int) -> Tensor:
    """Tokens kept per layer: round(Σ_i P_keep) per image, the max over images, ≥ min_keep -> (L,)."""
    k = torch.round(p_keep.sum(-1)).amax(-1)
    return k.clamp_min(min_keep).clamp_max(p_keep.shape[-1]).long()


def keep_order(H: Tensor) -> Tensor:
    """Token indices by keep priority: lowest entropy first, ties by index (deterministic) -> (B, N)."""
    return torch.argsort(H, dim=-1, stable=True)


def edge_scores(x: Tensor, h: int, w: int) -> Tensor:
    """Local high-pass score of each token of a scale's input, its 3x3 neighbourhood's max: (B, N, C) -> (B, N).

    e_i = ||x_i - mean of x over the 3x3 window around i||² (edges replicated) marks object
    boundaries and texture, unlike the distance to the scale's global mean (`frequency`), which a
    smooth gradient background also scores high. Taking the max over the 3x3 window keeps the
    tokens on both sides of a boundary (a kept edge token attends to its neighbours at this scale,
    and pruned neighbours would only get cached updates). Ties inside a window go to the token
    with the higher own score (1e-3 of it is added).
    """
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"edge_scores: {n} tokens for a {h}x{w} grid")
    grid = x.float().transpose(1, 2).reshape(b, c, h, w)
    local_mean = F.avg_pool2d(F.pad(grid, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    own = (grid - local_mean).pow(2).sum(1, keepdim=True)
    spread = F.max_pool2d(own, 3, stride=1, padding=1)
    return (spread + 1e-3 * own).flatten(1)


def keep_indices(order: Tensor, k: int) -> Tensor:
    """The k highest-priority tokens of each image, sorted by position -> (B, k)."""
    return torch.sort(order[:, :k], dim=-1).values


def keep_index_table(order: Tensor, counts: Tensor, repeat: int = 1) -> Tensor:
    """Row l, first counts[l] columns: `keep_indices(order, counts[l]).repeat(repeat, 1)`.

    A token is kept at count k when its place in `order` (its rank) is below k; each row's kept
    positions are compacted in position order by one cumulative sum (column N collects the rest).
    Counts may live on the device: no host sync, a handful of launches whatever the number of
    layers (a sort per layer was ~30 % of a pruned scale's decision time on the GPU), and each
    layer's list is a view of the one `(L, repeat * B, N + 1)` result, so a captured unit copies
    one plan tensor per replay.
    """
    b, n = order.shape
    counts = torch.as_tensor(counts, device=order.device)
    positions = torch.arange(n, device=order.device).expand(b, n)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    kept = rank[None] < counts[:, None, None]  # (L, B, N)
    slot = torch.where(kept, kept.cumsum(-1) - 1, n)
    out = torch.empty((counts.numel(), b, n + 1), dtype=order.dtype, device=order.device)
    out.scatter_(2, slot, positions.expand(counts.numel(), b, n))
    return out.repeat(1, repeat, 1)

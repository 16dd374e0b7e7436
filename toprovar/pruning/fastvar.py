"""FastVAR cached token pruning (Guo et al. 2025, csguoh/FastVAR) in this runtime.

Facts from the official FastVAR Infinity code: at the pruned scales, blocks 3..27 score each
token by its squared distance to the scale's mean token (a high-pass "frequency" score, per
batch row), run only the highest-scoring tokens, and restore the pruned ones from the branch
outputs cached at the 24×24 scale, area-resized to the current grid. The paper's Table 8 gives
the ratios with 1-based scale numbers of the 13-scale 1M schedule: Infinity-2B {10: 0.4, 11: 0.6},
Infinity-8B {10: 0.4, 11: 0.6, 12: 1.0, 13: 1.0}; policies here use 0-based indices (9, 10, ...),
and the cache scale defaults to the one before the first pruned scale (index 8 = 24×24).

Granularity: FastVAR scores and restores before each of the three sub-layers of a block; this
runtime does it once per block (the block's kept tokens run self-attention, cross-attention
and FFN; a pruned token receives the block's whole cached update). Keys/values of pruned tokens
do not enter that layer's KV cache (as in FastVAR). A ratio of 1.0 skips the block: every token
takes its cached update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.policy import FastVARStage


def frequency_scores(x: Tensor) -> Tensor:
    """||x_i - mean(x)||² per token and row: (rows, N, C) -> (rows, N)."""
    xf = x.float()
    return (xf - xf.mean(dim=1, keepdim=True)).pow(2).sum(-1)


def top_tokens(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row, sorted by position (ties: lower index first)."""
    order = torch.argsort(-scores, dim=-1, stable=True)
    return torch.sort(order[:, :k], dim=-1).values


class FastVARPruner:
    def __init__(self, stage: FastVARStage):
        self.ratios = dict(stage.ratios)
        self.layers = range(*stage.layers)
        first = min(self.ratios) if self.ratios else 0
        self.cache_scale = stage.cache_scale if stage.cache_scale is not None else max(first - 1, 0)

    def begin(self, ctx) -> None:
        self.ctx = ctx
        self.deltas: dict[int, Tensor] = {}  # layer -> block update (rows, C, h, w) at the cache scale
        self.inputs: dict[int, Tensor] = {}
        self.pending: tuple[int, Tensor, Tensor] | None = None  # (layer, kept idx, block input)
        ctx.trace.pruning = {"method": "fastvar", "ratios": {int(k): float(v) for k, v in self.ratios.items()},
                             "layers": [self.layers.start, self.layers.stop], "cache_scale": self.cache_scale}

    def exit_before_scale(self, si: int) -> bool:
        return False

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def _grid(self, si: int) -> tuple[int, int]:
        _, h, w = self.ctx.schedule[si]
        return h, w

    def _restore(self, si: int, x: Tensor) -> None:
        """Give the previous block's pruned tokens their cached update (in place)."""
        if self.pending is None:
            return
        li, kept, _ = self.pending
        self.pending = None
        h, w = self._grid(si)
        delta = self.deltas.get(li)
        if delta is None:
            return
        fill = F.interpolate(delta.float(), size=(h, w), mode="area").flatten(2).transpose(1, 2).to(x.dtype)
        pruned = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pruned.scatter_(1, kept, False)
        x.add_(torch.where(pruned[..., None], fill, torch.zeros_like(fill)))

    def _finish_cache_layer(self, si: int, x: Tensor) -> None:
        if self.inputs:
            (li, before), = self.inputs.items()
            h, w = self._grid(si)
            self.deltas[li] = (x - before).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            self.inputs = {}

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        if si == self.cache_scale:
            self._finish_cache_layer(si, x)
            if li in self.layers:
                self.inputs = {li: x.clone()}
            return None
        self._restore(si, x)
        ratio = self.ratios.get(si)
        if ratio is None or li not in self.layers:
            return None
        n = x.shape[1]
        k = n - int(n * ratio)
        kept = top_tokens(frequency_scores(x), k)
        self.pending = (li, kept, x)
        return kept

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        pass

    def end_scale(self, si: int, x: Tensor) -> None:
        if si == self.cache_scale:
            self._finish_cache_layer(si, x)
        else:
            self._restore(si, x)

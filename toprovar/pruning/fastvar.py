"""FastVAR cached token pruning (Guo et al. 2025, csguoh/FastVAR) in this runtime.

Facts from the official FastVAR Infinity code (csguoh/FastVAR 9e93f7a, `Infinity/infinity/models/
fastvar_utils.py`, `fastvar_basic.py`, `infinity.py`): at the pruned scales, blocks 3..27 score each
token by its squared distance to the scale's mean token (a high-pass "frequency" score, per batch
row), run only the highest-scoring tokens, and restore the pruned ones from the branch outputs
cached at the 24×24 scale, area-resized to the current grid; keys/values of pruned tokens do not
enter the KV cache. Two configurations ship as policies:
  * the ToProVAR paper's Table 8 (`fastvar-<backbone>`): ratios with 1-based scale numbers of the
    13-scale 1M schedule, Infinity-2B {10: 0.4, 11: 0.6}, Infinity-8B {10: 0.4, 11: 0.6, 12: 1.0,
    13: 1.0}; here 0-based indices (9, 10, ...);
  * the authors' own (`fastvar_authors-<backbone>`; they ship Infinity-2B only, the 8B file applies
    the same hard-coded settings to 8B's schedule): ratios by grid width {32: 0.4, 40: 0.5}
    (scales 9 and 10 at 1M 1:1), and the 48×48 and 64×64 scales skipped outright (`continue` in
    `autoregressive_infer_cfg`: no transformer, no codes; the decode reads the codes summed up to
    the 40×40 scale, already at full resolution) — `exit_after_scale: 10` here.
The cache scale defaults to the one before the first pruned scale (index 8 = 24×24).

Granularity (documented deviation): FastVAR scores and restores before each of the three
sub-layers of a block (self-attention, cross-attention, FFN), each time from the current hidden
state; this runtime does it once per block (the block's kept tokens run all three sub-layers; a
pruned token receives the block's whole cached update, which is the sum of the three cached
branch outputs, so with one keep set per block the two agree and only the re-scoring between
sub-layers differs). `plan: per_scale` goes one step further: the tokens are scored once, at the
first pruned block's input, and that keep set serves every pruned block of the scale. Pruned
tokens are not read by a pruned block (kv_policy 'kept'), so their cached updates are added at
once when the plan is made; the scale then follows a plan fixed after its unpruned first blocks
(`static_plan`) and runs as the fast path's planned units. A ratio of 1.0 skips the block: every
token takes its cached update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.policy import FastVARStage
from toprovar.pruning.hooks import Pruner


def frequency_scores(x: Tensor) -> Tensor:
    """||x_i - mean(x)||² per token and row: (rows, N, C) -> (rows, N)."""
    xf = x.float()
    return (xf - xf.mean(dim=1, keepdim=True)).pow(2).sum(-1)


def top_tokens(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row, sorted by position (ties: lower index first)."""
    order = torch.argsort(-scores, dim=-1, stable=True)
    return torch.sort(order[:, :k], dim=-1).values


class FastVARPruner(Pruner):
    def __init__(self, stage: FastVARStage, skip_uncond_from_scale: int | None = None):
        super().__init__(skip_uncond_from_scale)
        self.ratios = dict(stage.ratios)
        self.layers = range(*stage.layers)
        first = min(self.ratios) if self.ratios else 0
        self.cache_scale = stage.cache_scale if stage.cache_scale is not None else max(first - 1, 0)
        self.exit_after = stage.exit_after_scale
        self.per_scale = stage.plan == "per_scale"

    def begin(self, ctx) -> None:
        self.ctx = ctx
        self.deltas: dict[int, Tensor] = {}  # layer -> block update (rows, C, h, w) at the cache scale
        self.inputs: dict[int, Tensor] = {}
        self.pending: tuple[int, Tensor, Tensor] | None = None  # (layer, kept idx, block input)
        self.plan: tuple[int, Tensor] | None = None  # per_scale: (scale, kept idx of every pruned block)
        ctx.trace.pruning = {
            "method": "fastvar",
            "ratios": {int(k): float(v) for k, v in self.ratios.items()},
            "layers": [self.layers.start, self.layers.stop],
            "cache_scale": self.cache_scale,
            "exit_after_scale": self.exit_after,
            "plan": "per_scale" if self.per_scale else "per_block",
        }

    def exit_before_scale(self, si: int) -> bool:
        return self.exit_after is not None and si > self.exit_after

    @property
    def plans_statically(self) -> bool:
        return self.per_scale

    def acts_at(self, si: int) -> bool:
        """The scales it prunes (a configured ratio) and the cache scale, whose blocks' updates it
        records; none when no block of the model is in `layers`."""
        if not any(li in self.layers for li in range(self.ctx.depth)):
            return False
        return si in self.ratios or si == self.cache_scale

    def static_plan(self, si: int) -> int | None:
        """per_scale: the blocks before the first pruned one are the probe layers (every token), the
        plan is made from their output; the cache scale records every block's update (no plan)."""
        if not self.per_scale or si == self.cache_scale:
            return None
        return min(self.layers.start, self.ctx.depth) if si in self.ratios else 0

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def _grid(self, si: int) -> tuple[int, int]:
        _, h, w = self.ctx.schedule[si]
        return h, w

    def _fill(self, si: int, li: int, x: Tensor) -> Tensor | None:
        """Layer li's cached update resized to scale si's grid, (rows of x, N, C) in x's dtype, or None.
        A cache scale before a CFG skip has the unconditional rows too: the first rows are kept."""
        delta = self.deltas.get(li)
        if delta is None:
            return None
        h, w = self._grid(si)
        return (
            F.interpolate(delta[: x.shape[0]].float(), size=(h, w), mode="area").flatten(2).transpose(1, 2).to(x.dtype)
        )

    def _pruned(self, x: Tensor, kept: Tensor) -> Tensor:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, kept, False)

    def _restore(self, si: int, x: Tensor) -> None:
        """Give the previous block's pruned tokens their cached update (in place)."""
        if self.pending is None:
            return
        li, kept, _ = self.pending
        self.pending = None
        fill = self._fill(si, li, x)
        if fill is not None:
            x.add_(torch.where(self._pruned(x, kept)[..., None], fill, torch.zeros_like(fill)))

    def _restore_plan(self, si: int, x: Tensor, kept: Tensor) -> None:
        """per_scale: the pruned tokens take the cached updates of every pruned block at once (in place)."""
        fills = [f for f in (self._fill(si, li, x) for li in self.layers) if f is not None]
        if fills:
            x.add_(torch.where(self._pruned(x, kept)[..., None], sum(fills[1:], fills[0]), torch.zeros_like(fills[0])))

    def _finish_cache_layer(self, si: int, x: Tensor) -> None:
        if self.inputs:
            ((li, before),) = self.inputs.items()
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
        if self.per_scale and self.plan is not None and self.plan[0] == si:
            return self.plan[1]
        n = x.shape[1]
        kept = top_tokens(frequency_scores(x), n - int(n * ratio))
        if self.per_scale:
            self._restore_plan(si, x, kept)
            self.plan = (si, kept)
        else:
            self.pending = (li, kept, x)
        return kept

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        pass

    def end_scale(self, si: int, x: Tensor) -> None:
        if si == self.cache_scale:
            self._finish_cache_layer(si, x)
        else:
            self._restore(si, x)

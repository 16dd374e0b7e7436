"""`StaticBuffers`: the inputs of one static key (KV cache, text condition, AdaLN vectors) at
fixed addresses, so that captured CUDA graphs read each call's values."""

from __future__ import annotations

import torch
from torch import Tensor

from toprovar.fast.rows import RowInputs, row_views
from toprovar.models.transformer import Condition, InfinityTransformer, RopeSlice, TextKV
from toprovar.sampling import GuidedSampling
from toprovar.schedules import tokens_per_scale


class StaticBuffers:
    """KV cache, AdaLN vectors, text K/V and pooled text for every row, plus per-scale input
    tokens. A scale after a CFG skip runs on views of the first `batch` rows."""

    def __init__(
        self,
        model: InfinityTransformer,
        *,
        schedule,
        batch: int,
        cond: Condition,
        rope: Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model, self.batch, self.rope = model, batch, rope
        self.sampling: GuidedSampling | None = None  # the current call's, set by `load`
        self.tokens = tokens_per_scale(schedule)
        self.offsets = [sum(self.tokens[:i]) for i in range(len(self.tokens))]
        self.cache = model.new_cache(cond.rows, sum(self.tokens), dtype, device)
        self.cond = Condition(
            torch.empty_like(cond.cond_BD),
            torch.empty_like(cond.gss),
            [
                TextKV(
                    torch.empty_like(t.k), torch.empty_like(t.v), None if t.mask is None else torch.empty_like(t.mask)
                )
                for t in cond.text
            ],
        )
        self.ada = torch.empty((model.depth, *cond.gss.shape), dtype=torch.float32, device=device)
        # Every row count a call may run: all rows, and the conditional ones after a CFG skip. One
        # state serves calls with and without a skip (compare alternates them), graphs per row count.
        self.views = row_views(RowInputs(self.cond, list(self.ada), self.cache), (cond.rows, batch))
        self.x_in: dict[tuple[int, int], Tensor] = {}  # (scale, rows) -> the scale's input tokens
        for block in model.blocks:  # constants made on the main stream, before any capture
            block._fast_constants()

    def at(self, x: Tensor) -> RowInputs:
        """The static inputs of the rows of `x` (all, or the conditional ones after a CFG skip)."""
        return self.views[x.shape[0]]

    def rope_at(self, si: int) -> RopeSlice:
        off, n = self.offsets[si], self.tokens[si]
        return RopeSlice(self.rope[0, off : off + n], self.rope[1, off : off + n])

    def load(self, cond: Condition, sampling: GuidedSampling) -> None:
        """Copy this call's text-dependent inputs into the buffers; its sampling (guidance,
        temperature, top-k/p per scale) selects the graphs and head units captured with it."""
        self.sampling = sampling
        static = self.cond
        static.gss.copy_(cond.gss)
        with torch.autocast(static.gss.device.type, enabled=False):
            for li, block in enumerate(self.model.blocks):
                self.ada[li].copy_(block.ada(cond.gss))
        static.cond_BD.copy_(cond.cond_BD)
        for dst, src in zip(static.text, cond.text):
            dst.k.copy_(src.k)
            dst.v.copy_(src.v)
            if dst.mask is not None:
                dst.mask.copy_(src.mask)

    def input_at(self, si: int, x: Tensor) -> tuple[int, int]:
        """Copy scale si's input tokens into their buffer; returns its key (scale, rows)."""
        at = (si, x.shape[0])
        if at not in self.x_in:
            self.x_in[at] = torch.empty_like(x)
        self.x_in[at].copy_(x)
        return at

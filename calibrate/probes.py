"""A measurement pruner for pre-sampling: records entropy, changes nothing.

It follows the `toprovar.pruning.Pruner` hook contract (docs/architecture.md), so pre-sampling runs
the same generation loop as the runtime.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toprovar.pruning.hooks import Pruner, PrunerContext


class EntropyRecorder(Pruner):
    """Records every block's per-token attention entropy: head mean of the conditional rows.

    `maps[(si, li)]` is `(B, h*w)` float32 on the CPU after `collect()`; tensors stay on the
    device during generation (no host sync inside the loop).
    """

    plans_statically = True

    def begin(self, ctx: PrunerContext) -> None:
        self.batch, self.depth = ctx.batch, ctx.depth
        self.maps: dict[tuple[int, int], Tensor] = {}

    def static_plan(self, si: int) -> int:
        """Every block is a probe layer (all tokens, entropy observed) and nothing is pruned, so on
        the fast path a scale runs as one unit of the static buffers (a CUDA graph once it recurs,
        i.e. from the second batch on) instead of block by block."""
        return self.depth

    def wants_entropy(self, si: int, li: int) -> bool:
        return True

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        self.maps[(si, li)] = entropy[: self.batch].float().mean(dim=1)

    def collect(self) -> dict[tuple[int, int], Tensor]:
        return {key: value.cpu() for key, value in self.maps.items()}


def entropy_stack(maps: dict[tuple[int, int], Tensor], scale: int, depth: int) -> Tensor:
    """`(B, depth, tokens)` entropy of every layer at one scale."""
    return torch.stack([maps[(scale, li)] for li in range(depth)], dim=1)

"""The hook contract between the generation loop (toprovar.pipeline) and a pruner.

The loop calls `begin` once per call with a `PrunerContext`, then per scale `exit_before_scale`,
per block `wants_entropy` / `keep_tokens` / `observe`, and `end_scale` (docs/architecture.md).
`NoPruner` runs every scale, layer and token; a pruner that needs only some hooks subclasses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from toprovar.trace import Trace


@dataclass
class PrunerContext:
    schedule: list[tuple[int, int, int]]
    depth: int
    num_heads: int
    batch: int  # images
    rows: int  # rows of the transformer batch at scale 0: 2 * batch under CFG (conditional rows first)
    device: torch.device
    trace: Trace
    scale_rows: tuple[int, ...] = ()  # rows per scale: `batch` from a CFG skip's scale on (empty: `rows` everywhere)
    # The loop's FastOptions.host_plan: a pruner may take keep counts that its policy fixes from
    # the host and read no device value it does not decide on (no host sync per scale).
    host_plan: bool = False

    def rows_at(self, si: int) -> int:
        """Rows of the transformer batch at scale si (the unconditional ones dropped after a CFG skip)."""
        return self.scale_rows[si] if self.scale_rows else self.rows


@runtime_checkable
class Pruner(Protocol):
    """The hooks of the generation loop. Optional: `static_plan(si)` (the fast path's planned units)
    and the attribute `skip_uncond_from_scale` (int or None: the CFG skip of the policy the pruner
    was built from; `as_pruner` sets it; the loop reads it with a default of None)."""

    def begin(self, ctx: PrunerContext) -> None: ...
    def exit_before_scale(self, si: int) -> bool: ...
    def wants_entropy(self, si: int, li: int) -> bool: ...
    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None: ...
    def observe(self, si: int, li: int, entropy: Tensor) -> None: ...
    def end_scale(self, si: int, x: Tensor) -> None: ...


class NoPruner:
    """Runs every scale, every layer, every token (with its policy's CFG skip, if any)."""

    skip_uncond_from_scale: int | None = None

    def begin(self, ctx: PrunerContext) -> None:
        pass

    def exit_before_scale(self, si: int) -> bool:
        return False

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        return None

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        pass

    def end_scale(self, si: int, x: Tensor) -> None:
        pass

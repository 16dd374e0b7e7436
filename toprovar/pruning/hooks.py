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
    rows: int  # rows of the transformer batch: 2 * batch under CFG (conditional rows first)
    device: torch.device
    trace: Trace
    # The loop's FastOptions.host_plan: a pruner may take keep counts that its policy fixes from
    # the host and read no device value it does not decide on (no host sync per scale).
    host_plan: bool = False


@runtime_checkable
class Pruner(Protocol):
    def begin(self, ctx: PrunerContext) -> None: ...
    def exit_before_scale(self, si: int) -> bool: ...
    def wants_entropy(self, si: int, li: int) -> bool: ...
    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None: ...
    def observe(self, si: int, li: int, entropy: Tensor) -> None: ...
    def end_scale(self, si: int, x: Tensor) -> None: ...


class NoPruner:
    """Runs every scale, every layer, every token."""

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

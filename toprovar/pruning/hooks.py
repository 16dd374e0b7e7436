"""The hook contract between the generation loop (toprovar.pipeline) and a pruner.

The loop calls `begin` once per call with a `PrunerContext`, then per scale `exit_before_scale`,
per block `wants_entropy` / `keep_tokens` / `observe`, and `end_scale` (docs/architecture.md).
`Pruner` declares every hook with defaults that prune nothing; a pruner overrides the hooks it
needs. `NoPruner` runs every scale, layer and token (`acts_at` False everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from toprovar.policy import GuidanceStage, Policy, check_policy_for_backbone

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

    def check_policy(self, policy: Policy) -> None:
        """Refuse, in one line, a policy whose scale indices or layers this run does not have
        (`toprovar.policy.check_policy_for_backbone` against this call's schedule and depth). The
        commands check it before any weights load; this catches the Python API's
        `generate(..., policy=path)`, which would otherwise run a scale past the schedule as never
        reached, unpruned. The backbone's name is the commands' check (they may allow another)."""
        check_policy_for_backbone(
            policy,
            backbone=self.trace.backbone,
            n_scales=len(self.schedule),
            depth=self.depth,
            allow_other_backbone=True,
        )


class Pruner:
    """Every hook and property the generation loop reads; the defaults prune nothing.

    A pruner is built for one generation call and receives everything it decides from at
    construction: the loop never sets an attribute on it.

    - `skip_uncond_from_scale`: the policy's CFG skip (int or None), given to `__init__`.
    - `acts_at(si)`: False promises that at scale `si` no hook below `exit_before_scale` removes
      work, reads entropy or reads the hidden states (`wants_entropy` False, `keep_tokens` None
      and leaves x as it is, `end_scale` leaves x as it is), so the loop may run the scale exactly
      as unpruned (its whole-scale graph on the fast path) and skip `wants_entropy` / `keep_tokens`
      / `observe` there; `end_scale` is still called. True (the default, always safe) lets the
      pruner decide block by block (or by `static_plan`). Exits are `exit_before_scale`'s, not
      `acts_at`'s: a pruner that only exits acts nowhere. Asked after `begin` (it may depend on
      the schedule and depth).
    - `plans_statically`: whether `static_plan` is meaningful (a pruner that overrides it says
      so); False: every acting scale runs block by block and the loop never calls `static_plan`.
    - `static_plan(si)`: the number of probe layers after which the keep indices of every later
      block of scale `si` are fixed (the fast path's planned units), or None (block by block).
    """

    plans_statically: bool = False

    _skip_uncond_from_scale: int | None = None  # a subclass that takes no CFG skip need not call __init__

    def __init__(self, skip_uncond_from_scale: int | None = None):
        self._skip_uncond_from_scale = skip_uncond_from_scale

    @property
    def skip_uncond_from_scale(self) -> int | None:
        return self._skip_uncond_from_scale

    def begin(self, ctx: PrunerContext) -> None:
        return None

    def exit_before_scale(self, si: int) -> bool:
        return False

    def acts_at(self, si: int) -> bool:
        return True

    def static_plan(self, si: int) -> int | None:
        return None

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        return None

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        return None

    def end_scale(self, si: int, x: Tensor) -> None:
        return None


class NoPruner(Pruner):
    """Runs every scale, every layer, every token (with its policy's CFG skip, if any)."""

    def begin(self, ctx: PrunerContext) -> None:
        ctx.check_policy(Policy(method="none", guidance=GuidanceStage(self.skip_uncond_from_scale)))

    def acts_at(self, si: int) -> bool:
        return False

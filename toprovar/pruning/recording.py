"""Which tokens ran, recorded beside any pruner: `KeptTokenRecorder` / `record_kept_tokens`.

`toprovar.trace` stays plain data (it imports no pruner); the recorder fills its `kept_index`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from toprovar.pruning import as_pruner
from toprovar.pruning.hooks import Pruner, PrunerContext


class KeptTokenRecorder(Pruner):
    """A pruner wrapper: delegates every hook and property and keeps, in `trace.kept_index`, the
    index tensor its `keep_tokens` returned for each (scale, layer) (references: no copy, no host
    sync). Decisions, numerics and the execution path are the wrapped pruner's."""

    def __init__(self, pruner: Pruner):
        super().__init__(pruner.skip_uncond_from_scale)
        self.pruner = pruner

    @property
    def plans_statically(self) -> bool:
        return self.pruner.plans_statically

    def begin(self, ctx: PrunerContext) -> None:
        ctx.trace.kept_index = self.index = {}
        self.pruner.begin(ctx)

    def exit_before_scale(self, si: int) -> bool:
        return self.pruner.exit_before_scale(si)

    def acts_at(self, si: int) -> bool:
        return self.pruner.acts_at(si)

    def static_plan(self, si: int) -> int | None:
        return self.pruner.static_plan(si)

    def wants_entropy(self, si: int, li: int) -> bool:
        return self.pruner.wants_entropy(si, li)

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        keep = self.pruner.keep_tokens(si, li, x)
        if keep is not None:
            self.index[(si, li)] = keep
        return keep

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        self.pruner.observe(si, li, entropy)

    def end_scale(self, si: int, x: Tensor) -> None:
        self.pruner.end_scale(si, x)


def record_kept_tokens(policy: Any) -> KeptTokenRecorder:
    """`policy` (None/'none', a Policy, a name/path, a Pruner) as a pruner that records kept tokens."""
    return KeptTokenRecorder(as_pruner(policy))

"""Fixed scale exit (Table 10, "Fix Scale Exit"): run scales 0..exit_scale, decode from their codes."""

from __future__ import annotations

from toprovar.policy import FixedExitStage, GuidanceStage, Policy
from toprovar.pruning.hooks import Pruner, PrunerContext


class FixedExitPruner(Pruner):
    plans_statically = True

    def __init__(self, exit_scale: int, skip_uncond_from_scale: int | None = None):
        super().__init__(skip_uncond_from_scale)
        self.exit_scale = exit_scale

    def begin(self, ctx: PrunerContext) -> None:
        skip = GuidanceStage(self.skip_uncond_from_scale)
        ctx.check_policy(Policy(method="fixed_exit", fixed_exit=FixedExitStage(self.exit_scale), guidance=skip))
        ctx.trace.pruning = {"method": "fixed_exit", "exit_scale": self.exit_scale}

    def exit_before_scale(self, si: int) -> bool:
        return si > self.exit_scale

    def acts_at(self, si: int) -> bool:
        """Every scale that runs is unpruned: the exit is `exit_before_scale`'s."""
        return False

    def static_plan(self, si: int) -> int | None:
        """No probe layers and no keep decisions: every scale that runs is one planned unit."""
        return 0

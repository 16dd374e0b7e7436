"""Fixed scale exit (Table 10, "Fix Scale Exit"): run scales 0..exit_scale, decode from their codes."""

from __future__ import annotations

from toprovar.policy import Policy
from toprovar.pruning.hooks import Pruner, PrunerContext


class FixedExitPruner(Pruner):
    plans_statically = True

    def __init__(self, policy: Policy):
        super().__init__(policy.guidance.skip_uncond_from_scale)
        self.policy = policy
        self.exit_scale = policy.fixed_exit.exit_scale

    def begin(self, ctx: PrunerContext) -> None:
        ctx.check_policy(self.policy)
        ctx.trace.pruning = {"method": "fixed_exit", "exit_scale": self.exit_scale}

    def exit_before_scale(self, si: int) -> bool:
        return si > self.exit_scale

    def acts_at(self, si: int) -> bool:
        """Every scale that runs is unpruned: the exit is `exit_before_scale`'s."""
        return False

    def static_plan(self, si: int) -> int | None:
        """No probe layers and no keep decisions: every scale that runs is one planned unit."""
        return 0

"""Fixed scale exit (Table 10, "Fix Scale Exit"): run scales 0..exit_scale, decode from their codes."""
from __future__ import annotations

from torch import Tensor


class FixedExitPruner:
    def __init__(self, exit_scale: int):
        self.exit_scale = exit_scale

    def begin(self, ctx) -> None:
        ctx.trace.pruning = {"method": "fixed_exit", "exit_scale": self.exit_scale}

    def exit_before_scale(self, si: int) -> bool:
        return si > self.exit_scale

    def static_plan(self, si: int) -> int | None:
        """No probe layers and no keep decisions: every scale that runs is one planned unit."""
        return 0

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        return None

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        pass

    def end_scale(self, si: int, x: Tensor) -> None:
        pass

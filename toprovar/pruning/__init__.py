"""Pruners: the policy's decisions, plugged into the generation loop's hooks (toprovar.pipeline).

The hook contract (`Pruner`, `PrunerContext`, `NoPruner`) is in `hooks`. `as_pruner(policy)` turns
a `toprovar.policy.Policy` (or a path/name of one, None, or a Pruner) into a fresh pruner for one
generation call; the policy's CFG skip (`guidance.skip_uncond_from_scale`, any method) travels on
it as the read-only property `skip_uncond_from_scale` (given at construction), which the loop
reads. A pruner made from a policy checks it against the call's schedule and depth at `begin`
(`PrunerContext.check_policy`). Stage math lives in `stages` (pure tensor functions, testable alone); each pruner module
wires the stages to the hooks.
"""

from __future__ import annotations

from typing import Any

from toprovar.policy import Policy, load_policy
from toprovar.pruning.hooks import NoPruner, Pruner, PrunerContext


def as_pruner(policy: Any) -> Pruner:
    """None / 'none' -> NoPruner; a Pruner as is; a Policy, or a name/path of one -> its pruner,
    carrying the policy's CFG skip."""
    if policy is None or policy == "none":
        return NoPruner()
    if isinstance(policy, Pruner):
        return policy
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    return _method_pruner(policy)


def _method_pruner(policy: Policy) -> Pruner:
    skip = policy.guidance.skip_uncond_from_scale
    if policy.method == "none":
        return NoPruner(skip)
    if policy.method == "toprovar":
        from toprovar.pruning.toprovar import ToProVARPruner

        return ToProVARPruner(policy)
    if policy.method == "fastvar":
        from toprovar.pruning.fastvar import FastVARPruner

        return FastVARPruner(policy)
    from toprovar.pruning.fixed_exit import FixedExitPruner

    return FixedExitPruner(policy.fixed_exit.exit_scale, skip)


__all__ = ["NoPruner", "Pruner", "PrunerContext", "as_pruner"]

"""Pruners: the policy's decisions, plugged into the generation loop's hooks (toprovar.pipeline).

`build_pruner(policy)` turns a `toprovar.policy.Policy` (or a path/name of one) into a fresh
pruner for one generation call. Stage math lives in `stages` (pure tensor functions, testable
alone); each pruner module wires the stages to the hooks.
"""
from __future__ import annotations

from typing import Any

from toprovar.policy import Policy, load_policy


def build_pruner(policy: Any):
    from toprovar.pipeline import NoPruner

    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    if policy.method == "none":
        return NoPruner()
    if policy.method == "toprovar":
        from toprovar.pruning.toprovar import ToProVARPruner

        return ToProVARPruner(policy)
    if policy.method == "fastvar":
        from toprovar.pruning.fastvar import FastVARPruner

        return FastVARPruner(policy.fastvar)
    from toprovar.pruning.fixed_exit import FixedExitPruner

    return FixedExitPruner(policy.fixed_exit.exit_scale)


__all__ = ["build_pruner"]

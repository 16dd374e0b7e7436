"""Pruners: the policy's decisions, plugged into the generation loop's hooks (toprovar.pipeline).

`build_pruner(policy)` turns a `toprovar.policy.Policy` (or a path/name of one) into a fresh
pruner for one generation call; the policy's CFG skip (`guidance.skip_uncond_from_scale`, any
method) travels on it as the attribute `skip_uncond_from_scale`, which the loop reads. Stage
math lives in `stages` (pure tensor functions, testable alone); each pruner module wires the
stages to the hooks.
"""
from __future__ import annotations

from typing import Any

from toprovar.policy import Policy, load_policy


def build_pruner(policy: Any):
    """A fresh pruner of `policy` (a Policy, a path or a shipped name) carrying its CFG skip."""
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    pruner = _method_pruner(policy)
    pruner.skip_uncond_from_scale = policy.guidance.skip_uncond_from_scale  # read by the generation loop
    return pruner


def _method_pruner(policy: Policy):
    from toprovar.pipeline import NoPruner

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

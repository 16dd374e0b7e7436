"""A policy that removes no work costs nothing (issue 24 item 1): where a pruner does not act, or
its plan keeps every token, the scale runs the unpruned path and draws the unpruned bits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from toprovar.attention import attention
from toprovar.models.registry import build_backbone
from toprovar.pipeline import generate
from toprovar.policy import load_policy, policy_from_dict
from toprovar.pruning import Pruner


def _seeds(n: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def _same(a, b) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.images, b.images)


def _entropy_leaves_attention_unchanged() -> bool:
    """Whether `attention(entropy=True)` returns the bits of `entropy=False` (the probe layers'
    output then equals the unpruned blocks'), on the model's layout and a few shapes."""
    for lq, lk in ((1, 1), (16, 21), (64, 85)):
        q, k, v = (torch.randn(2, 2, n, 32) for n in (lq, lk, lk))
        if not torch.equal(
            attention(q, k, v, entropy=True, scale=1.0)[0], attention(q, k, v, entropy=False, scale=1.0)[0]
        ):
            return False
    return True


class ActsAt(Pruner):
    """Acts at the scales `plans` names; there, after one probe layer, keeps `plans[si]` (None:
    every token; else every other token from block 1 on)."""

    plans_statically = True

    def __init__(self, plans: dict[int, bool]):
        super().__init__()
        self.plans = plans
        self.asked: list[int] = []

    def acts_at(self, si: int) -> bool:
        return si in self.plans

    def static_plan(self, si: int) -> int | None:
        return 1

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        self.asked.append(si)
        if li == 0 or not self.plans[si]:
            return None
        return torch.arange(0, x.shape[1], 2).expand(x.shape[0], -1)


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_scales_a_pruner_leaves_alone_run_the_unpruned_graph(small, kv_policy: str) -> None:
    """Scales where the pruner does not act run as whole-scale graphs (its block hooks are not
    asked), a plan that keeps everything runs the unpruned kernels, and a whole-scale graph after
    a pruned scale (fewer cached keys under kv_policy 'kept') reads the cache it left: every image
    is the plain loop's."""
    seeds, prompts = _seeds(2), ["a red cube", "a cat on a mat"]
    n_scales = len(generate(small, prompts[:1], seeds[:1], fast=False).bits)
    for plans, paths in (
        ({3: False}, {3: "planned_all_kept"}),
        ({3: False, 4: True}, {3: "planned_all_kept", 4: "planned"}),
    ):
        plain = generate(small, prompts, seeds, policy=ActsAt(plans), kv_policy=kv_policy, fast=False)
        pruner = ActsAt(plans)
        fast = generate(small, prompts, seeds, policy=pruner, kv_policy=kv_policy, fast=True)
        _same(plain, fast)
        assert fast.runtime["scale_paths"] == [paths.get(si, "graph") for si in range(n_scales)]
        assert set(pruner.asked) == set(plans)
        assert not fast.runtime["graph_loop"]
        kept = [(r.scale, r.kept < r.tokens) for r in fast.trace.layers]
        assert {si for si, pruned in kept if pruned} == {si for si, prunes in plans.items() if prunes}


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny", device="cpu")


def test_none_policy_draws_the_unpruned_images_on_the_unpruned_graph(tiny) -> None:
    seeds, prompts = _seeds(1), ["a red circle"]
    plain = generate(tiny, prompts, seeds, fast=False)
    none = generate(tiny, prompts, seeds, policy=policy_from_dict({"method": "none"}), fast=True)
    _same(plain, none)
    assert none.runtime["graph_loop"] and set(none.runtime["scale_paths"]) == {"graph"}


@pytest.mark.skipif(
    not _entropy_leaves_attention_unchanged(),
    reason="needs attention(entropy=True) to return entropy=False's output bit for bit (issue 25 item 2)",
)
def test_toprovar_policy_that_selects_nothing_draws_the_unpruned_images(tiny) -> None:
    """The shipped tiny policy with a crossing no ρ_s reaches (ρ_s ≤ 0), no restoration and no CFG
    skip removes no work: its scales run as unpruned graphs or as probe layers followed by the
    unpruned kernels (`planned_all_kept`), and the images are the unpruned ones."""
    shipped = load_policy("tiny")
    policy = replace(
        shipped,
        scale=replace(shipped.scale, tau=0.0, crossing="below"),
        token=replace(shipped.token, restore="none"),
        guidance=replace(shipped.guidance, skip_uncond_from_scale=None),
    )
    seeds, prompts = _seeds(1), ["a red circle"]
    plain = generate(tiny, prompts, seeds, fast=False)
    nothing = generate(tiny, prompts, seeds, policy=policy, fast=True)
    _same(plain, nothing)
    paths = nothing.runtime["scale_paths"]
    assert set(paths) <= {"graph", "planned_all_kept"} and "planned_all_kept" in paths
    assert all(r.kept == r.tokens for r in nothing.trace.layers)

"""FastVAR as its authors ship it for Infinity (issue 16 item 2): the exit after the 40×40 scale,
the per-scale plan that runs on the fast path's planned units, and the shipped policies."""

from __future__ import annotations

import pytest
import torch

from toprovar.errors import UserError
from toprovar.fast import release_fast_runtime
from toprovar.pipeline import generate
from toprovar.policy import check_policy_for_backbone, check_policy_for_spec, load_policy, policy_from_dict
from toprovar.pruning.recording import record_kept_tokens


def _seeds(n: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def _fastvar(**fields):
    return policy_from_dict(
        {"method": "fastvar", "fastvar": {"ratios": {4: 0.4, 5: 0.5}, "layers": [1, 2], "cache_scale": 3, **fields}}
    )


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"exit_after_scale": 4}, "fastvar.exit_after_scale: got 4, expected an integer >= 5"),
        ({"exit_after_scale": -1}, "fastvar.exit_after_scale"),
        ({"exit_after_scale": 5.5}, "fastvar.exit_after_scale"),
        ({"plan": "per_layer"}, "fastvar.plan: got 'per_layer', expected one of per_block, per_scale"),
    ],
)
def test_bad_fastvar_fields_are_one_line_errors(fields, where) -> None:
    with pytest.raises(UserError) as err:
        _fastvar(**fields)
    assert "\n" not in str(err.value) and where in str(err.value)


def test_exit_after_scale_must_lie_in_the_schedule() -> None:
    policy = _fastvar(exit_after_scale=10)
    check_policy_for_backbone(policy, backbone="tiny", n_scales=11, depth=12)
    with pytest.raises(UserError, match=r"fastvar.exit_after_scale: got 10, expected a scale index in \[0, 6\]"):
        check_policy_for_backbone(policy, backbone="test-small", n_scales=7, depth=2)


def test_shipped_authors_policies_are_the_authors_defaults() -> None:
    for backbone in ("infinity-2b", "infinity-8b"):
        policy = check_policy_for_spec(load_policy(f"fastvar_authors-{backbone}", backbone), backbone)
        stage = policy.fastvar
        # Widths 32 and 40 of the 1M 1:1 schedule are scales 9 and 10; the 24x24 scale caches; 48 and 64 are skipped.
        assert dict(stage.ratios) == {9: 0.4, 10: 0.5} and stage.layers == (3, 28)
        assert stage.cache_scale == 8 and stage.exit_after_scale == 10 and stage.plan == "per_scale"
        assert "9e93f7a5" in policy.provenance["source"] and policy.provenance["calibrated"] is False
        from toprovar.models.registry import get_backbone

        schedule = get_backbone(backbone).schedules.scale_schedule(1.0, "1M")
        assert [schedule[i][2] for i in (8, 9, 10, 11, 12)] == [24, 32, 40, 48, 64]


def test_exit_after_scale_stops_after_that_scale(small) -> None:
    seeds = _seeds(2)
    prompts = ["a red cube", "two dogs"]
    run = generate(small, prompts, seeds, policy=_fastvar(exit_after_scale=5))
    plain = generate(small, prompts, seeds)
    assert len(run.bits) == 6 and [s.exited for s in run.trace.scales] == [False] * 6 + [True]
    assert all(torch.equal(a, b) for a, b in zip(run.bits[:4], plain.bits[:4]))  # before the first pruned scale
    assert run.trace.pruning["exit_after_scale"] == 5


def test_per_scale_plan_keeps_one_set_and_equals_per_block_with_one_pruned_block(small) -> None:
    seeds = _seeds(2)
    prompts = ["a red cube", "a cat on a mat"]
    # One pruned block: its pruned tokens are not read by it, so restoring them before or after it is the same.
    block = generate(small, prompts, seeds, policy=_fastvar(plan="per_block"))
    scale = generate(small, prompts, seeds, policy=_fastvar(plan="per_scale"))
    assert all(torch.equal(a, b) for a, b in zip(block.bits, scale.bits)) and torch.equal(block.images, scale.images)
    # Two pruned blocks: per_scale scores once (the keep set of block 0 serves block 1), per_block twice.
    kept = {}
    for plan in ("per_block", "per_scale"):
        run = generate(small, prompts, seeds, policy=record_kept_tokens(_fastvar(plan=plan, layers=[0, 2])))
        kept[plan] = run.trace.kept_index
        assert sorted(kept[plan]) == [(4, 0), (4, 1), (5, 0), (5, 1)]
    assert all(torch.equal(kept["per_scale"][(si, 0)], kept["per_scale"][(si, 1)]) for si in (4, 5))
    assert all(torch.equal(kept["per_block"][(si, 0)], kept["per_scale"][(si, 0)]) for si in (4, 5))


@pytest.mark.parametrize("layers", [[1, 2], [0, 2]])
def test_per_scale_plan_runs_as_planned_units_bit_identical(small, layers) -> None:
    seeds = _seeds(2)
    prompts = ["a red cube", "two blue balls"]
    for fields in (
        {"plan": "per_scale"},
        {"plan": "per_scale", "exit_after_scale": 5},
        {"plan": "per_block", "exit_after_scale": 6},
    ):
        policy = _fastvar(layers=layers, **fields)
        plain = generate(small, prompts, seeds, policy=policy, fast=False)
        fast = generate(small, prompts, seeds, policy=policy, fast=True)
        assert all(torch.equal(a, b) for a, b in zip(plain.bits, fast.bits)) and torch.equal(plain.images, fast.images)
        per_scale = fields["plan"] == "per_scale"  # per_block re-scores after every block: block by block
        assert fast.runtime["planned_units"] == per_scale
        paths = fast.runtime["scale_paths"]
        assert ("planned" in paths) == per_scale and "graph" in paths  # scales before the cache: unpruned
    release_fast_runtime(small)


def test_table8_fastvar_runs_its_pruned_scales_as_planned_units(small) -> None:
    """The paper's FastVAR setting (`compare.default_policies`' `fastvar`, the shipped Table 8
    policies) scores once per scale, so its pruned scales run as planned units, the scales it leaves
    alone as unpruned graphs and only the cache scale block by block; images as the plain loop's."""
    from toprovar.compare import default_policies

    assert all(load_policy(f"fastvar-{b}").fastvar.plan == "per_scale" for b in ("infinity-2b", "infinity-8b"))
    seeds, prompts = _seeds(2), ["a red cube", "two blue balls"]
    n_scales = len(generate(small, prompts[:1], seeds[:1], fast=False).bits)
    policy = default_policies(n_scales, small.transformer.depth)["fastvar"]
    stage = policy.fastvar
    plain = generate(small, prompts, seeds, policy=policy, fast=False)
    fast = generate(small, prompts, seeds, policy=policy, fast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, fast.bits)) and torch.equal(plain.images, fast.images)
    expected = [
        "planned" if si in stage.ratios else "eager" if si == stage.cache_scale else "graph" for si in range(n_scales)
    ]
    assert fast.runtime["scale_paths"] == expected
    release_fast_runtime(small)

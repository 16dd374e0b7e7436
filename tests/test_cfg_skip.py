"""CFG skip (issue 16 item 1): `guidance.skip_uncond_from_scale` in the policy, the generation loop,
the fast path, the pruners, the trace and the FLOP count.

From the skip's scale on only the conditional rows run. Those rows never read the unconditional
ones, so a skip from s must give exactly what guidance scale 1 from s on gives with every row
still running (on CPU, bit for bit), while the trace and the FLOP count show half the rows.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from toprovar.errors import UserError
from toprovar.fast import FastOptions, release_fast_runtime
from toprovar.flops import layer_flops, trace_flops
from toprovar.models.transformer import KVCache
from toprovar.pipeline import generate
from toprovar.policy import GuidanceStage, Policy, check_policy_for_backbone, policy_from_dict
from toprovar.pruning.recording import record_kept_tokens

PROMPTS = ["a red cube on the grass", "two dogs", "a green ball left of a blue cube"]  # padded text rows
N_SCALES = 7  # test-small at its default pixels

# Every fewer-kernels switch of issue 16.3 on; small_m_rows covers the first scales of test-small.
MECHANICS = FastOptions(index_io=True, chain_blocks=True, host_plan=True, small_m_rows=80)


def _seeds(n: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def _same(a, b) -> None:
    assert len(a.bits) == len(b.bits) and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert torch.equal(a.images, b.images)


def _skip(policy: Policy, scale: int | None) -> Policy:
    return dataclasses.replace(policy, guidance=GuidanceStage(skip_uncond_from_scale=scale))


def _cfg_skip(scale: int | None) -> Policy:
    return policy_from_dict({"method": "none", "guidance": {"skip_uncond_from_scale": scale}})


# -- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 2.0, 2.5, True, "3", float("nan"), [3]])
def test_skip_values_outside_the_schema_are_one_line_errors(value) -> None:
    with pytest.raises(UserError) as err:
        policy_from_dict({"method": "none", "guidance": {"skip_uncond_from_scale": value}})
    message = str(err.value)
    assert "\n" not in message and "guidance.skip_uncond_from_scale" in message and "integer" in message
    with pytest.raises(UserError, match="guidance.skip_from: unknown key"):
        policy_from_dict({"method": "none", "guidance": {"skip_from": 3}})


@pytest.mark.parametrize("method", ["none", "toprovar", "fastvar", "fixed_exit"])
def test_skip_combines_with_every_method_and_must_lie_in_the_schedule(method) -> None:
    doc = {"method": method, "guidance": {"skip_uncond_from_scale": 12}}
    if method == "fastvar":
        doc["fastvar"] = {"ratios": {9: 0.4}}
    policy = policy_from_dict(doc)
    assert policy.guidance.skip_uncond_from_scale == 12 and policy.method == method
    assert check_policy_for_backbone(policy, backbone="infinity-2b", n_scales=13, depth=32) is policy
    expected = r"guidance.skip_uncond_from_scale: got 12, expected a scale index in \[0, 10\]"
    with pytest.raises(UserError, match=expected):
        check_policy_for_backbone(policy, backbone="tiny", n_scales=11, depth=32)
    assert policy_from_dict({"method": method, "fastvar": doc.get("fastvar")}).guidance.skip_uncond_from_scale is None


# -- the generation loop ---------------------------------------------------------------------------


def test_kv_cache_row_view_shares_storage_and_fill() -> None:
    cache = KVCache(depth=2, batch=4, num_heads=2, max_len=10, head_dim=4, dtype=torch.float32, device="cpu")
    view = cache.first_rows(2)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    view[1].append(k, v)
    assert cache[1].fill == 3 and cache.fills == [0, 3] and view.fills == [0, 3]
    assert torch.equal(cache[1].k[:2, :, :3], k) and torch.equal(cache[1].v[:2, :, :3], v)
    cache.set_fill(5)
    assert view.fills == [5, 5] and view[0].k.data_ptr() == cache[0].k.data_ptr() and view[0].k.is_contiguous()


def test_skip_is_guidance_one_from_that_scale_on_with_half_the_rows(small) -> None:
    """Bit for bit what per-scale guidance [g]*s + [1]*(n-s) gives with all rows; trace and FLOPs count the rows."""
    for skip in [0, *random.sample(range(1, N_SCALES), 2)]:  # 0: no unconditional row at all
        seeds = _seeds(len(PROMPTS))
        skipped = generate(small, PROMPTS, seeds, policy=_cfg_skip(skip), guidance_scale=3.0)
        reference = generate(small, PROMPTS, seeds, guidance_scale=[3.0] * skip + [1.0] * (N_SCALES - skip))
        plain = generate(small, PROMPTS, seeds, guidance_scale=3.0)
        _same(skipped, reference)
        rows = [r.rows for r in skipped.trace.scales]
        assert rows == [6] * skip + [3] * (N_SCALES - skip) and skipped.trace.rows == 6
        assert [r.rows for r in reference.trace.scales] == [6 if skip else 3] * N_SCALES
        # FLOPs: the skipped scales count half the rows, the unpruned reference keeps all of them.
        executed, unpruned = trace_flops(skipped.trace)
        assert unpruned == pytest.approx(trace_flops(plain.trace)[1])
        per_scale = {}
        for row in layer_flops(skipped.trace):
            per_scale[row["scale"]] = per_scale.get(row["scale"], 0.0) + row["flops_unpruned"]
        assert executed == pytest.approx(sum(u / (2 if si >= skip else 1) for si, u in per_scale.items()))
        # The scales before the skip are the unskipped run's.
        assert all(torch.equal(a, b) for a, b in zip(skipped.bits[:skip], plain.bits[:skip]))
    unguided = generate(small, PROMPTS[:1], [1], policy=_cfg_skip(2), guidance_scale=1.0)
    assert [r.rows for r in unguided.trace.scales] == [1] * N_SCALES
    assert trace_flops(unguided.trace)[0] == pytest.approx(trace_flops(unguided.trace)[1])  # nothing to skip


def _fixed_toprovar(depth: int, **token) -> Policy:
    from benchmarks.pruning import fixed_policy

    policy = fixed_policy(depth, min_scale=3, alpha=0.5, protect_layers=1)
    return dataclasses.replace(policy, token=dataclasses.replace(policy.token, **token)) if token else policy


def _fastvar(**fields) -> Policy:
    return policy_from_dict(
        {"method": "fastvar", "fastvar": {"ratios": {4: 0.4, 5: 0.6}, "layers": [1, 2], "cache_scale": 3, **fields}}
    )


def _policies(depth: int) -> list[Policy]:
    return [
        _cfg_skip(None),
        _fixed_toprovar(depth),
        _fixed_toprovar(depth, restore="cached", order="edge"),
        _fixed_toprovar(depth, restore="cached_layer"),
        _fastvar(),
        _fastvar(plan="per_scale"),
        _fastvar(plan="per_scale", exit_after_scale=5),
        policy_from_dict({"method": "fixed_exit", "fixed_exit": {"exit_scale": 5}}),
    ]


@pytest.mark.parametrize(("kv_policy", "fast_opts"), [("kept", True), ("all", True), ("kept", MECHANICS)])
def test_fast_path_with_skip_is_bit_identical_for_every_method(small, kv_policy: str, fast_opts) -> None:
    """Whole-scale graphs (no pruner), planned units (static plans) and eager scales take the
    skip's rows from its scale on: the same bits and images as the plain loop, also with the
    fewer-kernels switches (index_io, chain_blocks, host_plan, small_m_rows) on."""
    depth = small.transformer.depth
    for policy in _policies(depth):
        skip = random.choice([1, 3, 4, 5, 6])
        policy = _skip(policy, skip)
        seeds = _seeds(2)
        plain = generate(small, PROMPTS[:2], seeds, policy=policy, kv_policy=kv_policy, fast=False)
        fast = generate(small, PROMPTS[:2], seeds, policy=policy, kv_policy=kv_policy, fast=fast_opts)
        _same(plain, fast)
        assert fast.runtime["graph_loop"] == (policy.method in ("none", "fixed_exit"))  # they act at no scale
        assert [r.rows for r in fast.trace.scales] == [4] * skip + [2] * (N_SCALES - skip)
        a, b = plain.trace.layers_frame(), fast.trace.layers_frame()
        assert a[["scale", "layer", "kept"]].values.tolist() == b[["scale", "layer", "kept"]].values.tolist()
        again = generate(small, PROMPTS[:2], seeds, policy=_skip(policy, None), kv_policy=kv_policy, fast=fast_opts)
        assert [r.rows for r in again.trace.scales] == [4] * N_SCALES  # a new key: all rows again
    release_fast_runtime(small)


def test_pruners_see_the_rows_of_each_scale(small) -> None:
    """ToProVAR plans one keep list per row that runs; FastVAR scores each row; restoring from a cache
    scale that had the unconditional rows takes its conditional rows."""
    depth = small.transformer.depth
    for policy, skip in ((_fixed_toprovar(depth, restore="cached"), 4), (_fastvar(), 5), (_fastvar(), 3)):
        run = generate(small, PROMPTS[:2], _seeds(2), policy=record_kept_tokens(_skip(policy, skip)))
        shapes = {si: keep.shape[0] for (si, _), keep in run.trace.kept_index.items()}
        assert shapes and all(rows == (2 if si >= skip else 4) for si, rows in shapes.items()), shapes


# -- the calibration knob --------------------------------------------------------------------------


def test_search_knob_covers_never_and_is_fixed_without_guidance(calibrate_config) -> None:
    import optuna

    from calibrate.knobs import BY_NAME, PolicyFactory, SearchSpace, paper_defaults
    from calibrate.presample import PresampleSummary

    summary = PresampleSummary(
        crossing="below",
        tau_range=(0.2, 0.6),
        representative_scale=3,
        layer_ratios=[2.0, 1.5],
        band_points=0,
        prompts=0,
        scales=N_SCALES,
    )
    assert summary.guided and PresampleSummary.from_json({**summary.to_json(), "guided": False}).guided is False
    old_study = {k: v for k, v in summary.to_json().items() if k != "guided"}
    assert PresampleSummary.from_json(old_study).guided
    config = calibrate_config("backbone=test-small").search.space
    assert config["skip_uncond_from_scale"] is None  # searched by default
    space = SearchSpace.from_config(config, summary)
    assert space.ranges["skip_uncond_from_scale"] == (1, N_SCALES)  # N_SCALES: never
    unguided = SearchSpace.from_config(config, dataclasses.replace(summary, guided=False))
    assert unguided.ranges["skip_uncond_from_scale"] == (N_SCALES, N_SCALES)
    with pytest.raises(UserError, match="search.space.skip_uncond_from_scale"):  # past never
        SearchSpace.from_config({**config, "skip_uncond_from_scale": [1, N_SCALES + 1]}, summary)
    # The default (no skip) warm-starts at never; never is null in the policy, any other value a scale.
    assert paper_defaults()["skip_uncond_from_scale"] is None
    assert space.clip(paper_defaults())["skip_uncond_from_scale"] == N_SCALES
    factory = PolicyFactory(summary, "test-small")
    assert factory.document({"skip_uncond_from_scale": N_SCALES})["guidance"] == {"skip_uncond_from_scale": None}
    assert factory(paper_defaults()).guidance.skip_uncond_from_scale is None
    study = optuna.create_study(
        directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=random.randrange(1000))
    )
    seen = set()
    for _ in range(40):
        params = {**space.suggest(study.ask()), "protect_layers": 1}  # test-small has 2 layers
        value = params["skip_uncond_from_scale"]
        policy = check_policy_for_backbone(factory(params), backbone="test-small", n_scales=N_SCALES, depth=2)
        assert policy.guidance.skip_uncond_from_scale == (None if value == N_SCALES else value)
        seen.add(value)
    assert seen <= set(range(1, N_SCALES + 1)) and len(seen) > 3
    assert BY_NAME["skip_uncond_from_scale"].path == "guidance.skip_uncond_from_scale"


def test_calls_with_and_without_a_skip_share_the_static_state(small) -> None:
    """compare alternates a CFG-skip method with the others: one set of static buffers serves both
    (graphs per row count), so neither call re-allocates the KV cache nor re-captures its graphs."""
    seeds = _seeds(2)
    plain = generate(small, PROMPTS[:2], seeds, fast=True)
    state = small.fast_runtime.state
    skipped = generate(small, PROMPTS[:2], seeds, policy=_skip(_cfg_skip(None), 3), fast=True)
    assert small.fast_runtime.state is state
    again = generate(small, PROMPTS[:2], seeds, fast=True)
    assert small.fast_runtime.state is state
    _same(plain, again)  # the skip's scales did not disturb the full-row inputs
    assert [r.rows for r in skipped.trace.scales] == [4] * 3 + [2] * (N_SCALES - 3)
    assert sorted({rows for _, rows in state.buffers.x_in}) == [2, 4]
    release_fast_runtime(small)

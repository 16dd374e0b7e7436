"""The fast generation path (fused block stages, per-scale static step / CUDA graphs, sync-free
sampling) on CPU: the same function as the plain loop, bit for bit, with and without pruners."""

from __future__ import annotations

import pytest
import torch

from tests.backbones import SMALL
from toprovar.fast import FastOptions, release_fast_runtime, resolve_fast
from toprovar.models.transformer import InfinityTransformer, RopeSlice, random_state_dict
from toprovar.pipeline import generate
from toprovar.pruning import Pruner
from toprovar.sampling import draw_bits, make_generators
from toprovar.schedules import scale_schedule

# Every switch of the pruned-path mechanics (issue 16) on: CPU output must not move.
MECHANICS = FastOptions(index_io=True, chain_blocks=True, host_plan=True, small_m_rows=80)  # scales 0-4 small


def _seeds(n: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def _same(a, b) -> None:
    assert len(a.bits) == len(b.bits) and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", ["small", "patchify"])
def test_fast_path_is_bit_identical_on_cpu(name, request) -> None:
    backbone = request.getfixturevalue(name)
    prompts = ["a red cube on the grass", "two dogs", "a green ball left of a blue cube"]  # padded text rows
    s = _seeds(3)
    plain = generate(backbone, prompts, s, fast=False)
    fast = generate(backbone, prompts, s, fast=True)
    assert fast.runtime["graph_loop"] and not plain.runtime["graph_loop"]
    _same(plain, fast)
    again = generate(backbone, prompts, s, fast=True)  # static buffers reused for the same key
    assert again.runtime["graphs_captured"] is False
    _same(plain, again)
    for opts in (FastOptions(graphs=False), FastOptions(fused=False), FastOptions(sync_free_sampling=False), MECHANICS):
        _same(plain, generate(backbone, prompts, s, fast=opts))
    release_fast_runtime(backbone)


def test_fast_path_with_guidance_scale_one_and_per_scale_values(small) -> None:
    s = _seeds(1)
    kw = dict(
        guidance_scale=[1.0] * 3 + [2.0, 3.0, 3.0, 4.0], temperature=[1.0, 0.5, 0.5, 0.7, 1.0, 1.0, 0.9], top_p=0.9
    )
    _same(generate(small, ["a cube"], s, fast=False, **kw), generate(small, ["a cube"], s, fast=True, **kw))
    _same(
        generate(small, ["a cube"], s, fast=False, guidance_scale=1.0),
        generate(small, ["a cube"], s, fast=True, guidance_scale=1.0),
    )


class HalfTokens(Pruner):
    def wants_entropy(self, si: int, li: int) -> bool:
        return li == 1

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        if si < 3 or li == 1:
            return None
        return torch.arange(0, x.shape[1], 2).expand(x.shape[0], -1)


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_pruner_runs_eager_with_fused_full_layers(small, kv_policy: str) -> None:
    s = _seeds(2)
    plain = generate(
        small, ["a red cube", "a cat"], s, policy=HalfTokens(), kv_policy=kv_policy, fast=False, record_entropy=True
    )
    fast = generate(
        small, ["a red cube", "a cat"], s, policy=HalfTokens(), kv_policy=kv_policy, fast=True, record_entropy=True
    )
    assert not fast.runtime["graph_loop"]
    _same(plain, fast)
    a, b = plain.trace.layers_frame(), fast.trace.layers_frame()
    assert a["kept"].tolist() == b["kept"].tolist()
    assert a["entropy_mean"].fillna(-1).tolist() == b["entropy_mean"].fillna(-1).tolist()


class PlannedRows(Pruner):
    """Probe layer 0 (entropy), then a fixed plan: from scale 3 each row keeps its own half of the
    tokens (rows differ, so gathered RoPE differs per row); at scale 5 block 1 is skipped outright."""

    plans_statically = True

    def static_plan(self, si: int) -> int | None:
        return 1

    def wants_entropy(self, si: int, li: int) -> bool:
        return li == 0

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        if si < 3 or li == 0:
            return None
        if si == 5:
            return x.new_zeros((x.shape[0], 0), dtype=torch.long)
        n = x.shape[1]
        rows = [torch.arange(r % 2, n, 2) for r in range(x.shape[0])]
        k = min(len(r) for r in rows)
        return torch.stack([r[:k] for r in rows])


def _fixed_toprovar(depth: int, **token):
    from dataclasses import replace

    from benchmarks.pruning import fixed_policy

    policy = fixed_policy(depth, min_scale=3, alpha=0.5, protect_layers=1)
    return replace(policy, token=replace(policy.token, **token)) if token else policy


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_planned_pruners_run_as_units_bit_identical(small, kv_policy: str) -> None:
    """Pruners with a static plan take the unit path (probe layers / planned layers / head on the
    static buffers; CUDA graphs once a plan recurs): same bits and images as the plain loop."""
    from toprovar.policy import policy_from_dict

    s = _seeds(2)
    prompts = ["a red cube", "a cat on a mat"]
    depth = small.transformer.depth
    for policy in (
        PlannedRows(),
        _fixed_toprovar(depth),
        _fixed_toprovar(depth, restore="cached", order="frequency"),
        _fixed_toprovar(depth, restore="cached", order="edge"),
        policy_from_dict({"method": "fixed_exit", "fixed_exit": {"exit_scale": 4}}),
    ):
        plain = generate(small, prompts, s, policy=policy, kv_policy=kv_policy, fast=False)
        for opts in (True, MECHANICS):
            fast = generate(small, prompts, s, policy=policy, kv_policy=kv_policy, fast=opts)
            exits_only = getattr(policy, "method", "") == "fixed_exit"  # acts nowhere: every scale unpruned
            assert fast.runtime["planned_units"] and fast.runtime["graph_loop"] == exits_only
            assert (fast.runtime["units"]["eager"] > 0) != exits_only  # CPU: units are direct calls
            _same(plain, fast)
            a, b = plain.trace.layers_frame(), fast.trace.layers_frame()
            assert a[["scale", "layer", "kept"]].values.tolist() == b[["scale", "layer", "kept"]].values.tolist()
            assert plain.trace.pruning == fast.trace.pruning
            assert [r.rho for r in plain.trace.scales] == [r.rho for r in fast.trace.scales]
            assert (b["kept"] < b["tokens"]).any() or getattr(policy, "method", "") == "fixed_exit"
    release_fast_runtime(small)


def test_planned_unit_path_prunes_what_the_plan_says(small) -> None:
    fast = generate(small, ["a red cube"], _seeds(1), policy=PlannedRows(), fast=True)
    layers = fast.trace.layers_frame()
    late = layers[layers["scale"] >= 3]
    probe, planned = late[late["layer"] == 0], late[late["layer"] == 1]
    assert (probe["kept"] == probe["tokens"]).all()
    assert (planned[planned["scale"] == 5]["kept"] == 0).all()
    other = planned[planned["scale"] != 5]
    assert len(other) and (other["kept"] * 2 <= other["tokens"]).all() and (other["kept"] > 0).all()
    release_fast_runtime(small)


def test_fast_state_is_held_by_the_backbone_one_key_at_a_time(small) -> None:
    """The static buffers live in the backbone's `FastRuntime`, not on the model: a call with the
    same key reuses them, another batch size replaces them, `release_fast_runtime` frees them."""
    prompts, s = ["a red cube", "two dogs"], _seeds(2)
    first = generate(small, prompts, s, fast=True)
    state = small.fast_runtime.state
    assert state is not None and state.buffers.cache.fills == [sum(r.tokens for r in first.trace.scales)] * 2
    assert not any(type(v).__module__.startswith("toprovar.fast") for v in vars(small.transformer).values())
    generate(small, prompts, s, fast=True)
    assert small.fast_runtime.state is state
    generate(small, prompts[:1], s[:1], fast=True)
    assert small.fast_runtime.state is not state and small.fast_runtime.state.buffers.batch == 1
    release_fast_runtime(small)
    assert small.fast_runtime.state is None


def test_resolve_fast_defaults() -> None:
    assert resolve_fast(None, torch.device("cpu")) is None
    assert resolve_fast(None, torch.device("cuda")) == FastOptions()
    assert resolve_fast(True, torch.device("cpu")) == FastOptions()
    assert resolve_fast(FastOptions(graphs=False), torch.device("cpu")).graphs is False


def test_sync_free_draw_equals_multinomial() -> None:
    probs = torch.rand(3, 500, 2)
    probs[:, ::5] = torch.tensor([0.0, 1.0])
    probs = probs / probs.sum(-1, keepdim=True)
    seeds = _seeds(3)
    a = draw_bits(probs, make_generators(seeds, "cpu"), 50, sync_free=False)
    b = draw_bits(probs, make_generators(seeds, "cpu"), 50, sync_free=True)
    assert a.shape == (3, 50, 10) and torch.equal(a, b)


def test_forward_fast_equals_forward_block() -> None:
    cfg = SMALL
    model = InfinityTransformer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=int(torch.randint(0, 1000, ()).item())))
    schedule = scale_schedule(1.0, "0.06M")
    rope = model.rope_table(schedule, "cpu")
    with torch.inference_mode():
        cond = model.encode_condition(torch.randn(2, 5, cfg.text_channels), [5, 3], with_uncond=True)
        caches = [model.new_cache(4, 200, torch.float32, "cpu") for _ in range(2)]
        off = 0
        for n in (1, 4, 16):
            x = torch.randn(4, n, cfg.embed_dim)
            rs = RopeSlice(rope[0, off : off + n], rope[1, off : off + n])
            for li, block in enumerate(model.blocks):
                ref, _ = block(x, cond.gss, cond.text[li], rs, caches[0][li])
                out, _ = block.forward_fast(x, block.ada(cond.gss), cond.text[li], rs, caches[1][li])
                assert torch.equal(ref, out)
            off += n
        assert caches[0].fills == caches[1].fills == [off] * cfg.depth
        for a, b in ((caches[0]._k, caches[1]._k), (caches[0]._v, caches[1]._v)):
            assert torch.equal(a[:, :, :, :off], b[:, :, :, :off])


def test_block_chain_equals_blocks_one_by_one() -> None:
    """`run_fast_blocks` with the chain and rows through the index (on CPU the same op sequence)
    against `forward` block by block: every token, the same kept tokens in a run of blocks (kept
    gathered between them), other kept tokens per block, a skipped block, entropy where asked."""
    from dataclasses import replace

    from toprovar.fast.blocks import FastStep, run_fast_blocks

    cfg = replace(SMALL, depth=6)  # test-small's widths, six blocks
    model = InfinityTransformer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=int(torch.randint(0, 1000, ()).item())))
    rope = model.rope_table(scale_schedule(1.0, "0.06M"), "cpu")
    n, rows = 16, 4
    same = torch.stack([torch.sort(torch.randperm(n)[:9]).values for _ in range(rows)])
    other = torch.stack([torch.sort(torch.randperm(n)[:5]).values for _ in range(rows)])
    patterns = [
        [None] * 6,
        [same] * 6,
        [None, same, same, other, other[:, :0], same],
        [same, same[:, :0], same, None, None, other],
    ]
    with torch.inference_mode():
        cond = model.encode_condition(torch.randn(2, 5, cfg.text_channels), [5, 3], with_uncond=True)
        rs = RopeSlice(rope[0, 5 : 5 + n], rope[1, 5 : 5 + n])
        for keeps in patterns:
            entropy = [j % 3 == 0 for j in range(6)]
            x0 = torch.randn(rows, n, cfg.embed_dim)
            caches = [model.new_cache(rows, 40, torch.float32, "cpu") for _ in range(4)]
            prefix = torch.randn(2, *caches[0]._k.shape)  # earlier scales' keys and values, the same in all
            for c in caches:
                c._k.copy_(prefix[0])
                c._v.copy_(prefix[1])
                c.set_fill(5)
            ref, ref_ents = x0.clone(), []
            for li, (block, keep) in enumerate(zip(model.blocks, keeps)):
                ent = None
                if keep is None or keep.shape[1]:
                    ref, ent = block(ref, cond.gss, cond.text[li], rs, caches[0][li], keep=keep, entropy=entropy[li])
                ref_ents.append(ent)
            chained = [  # rows through the index or not, then the few-rows fusion (small_m_rows)
                FastOptions(gelu_epilogue=False, index_io=True, chain_blocks=True),
                FastOptions(gelu_epilogue=False, index_io=False, chain_blocks=True),
                FastOptions(gelu_epilogue=False, index_io=True, chain_blocks=True, small_m_rows=64),
            ]
            for c, switches in zip(caches[1:], chained):
                steps = [
                    FastStep(b, b.ada(cond.gss), cond.text[li], c[li], keeps[li], entropy[li])
                    for li, b in enumerate(model.blocks)
                ]
                out, ents = run_fast_blocks(steps, x0.clone(), rs, switches)
                assert torch.equal(out, ref)
                assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ents, ref_ents))
                assert c.fills == caches[0].fills
                assert torch.equal(c._k[:, :, :, :40], caches[0]._k[:, :, :, :40])

"""Pruning stages (pure math) and pruners running inside the generation loop on test-small."""

from __future__ import annotations

import math

import pytest
import torch

from toprovar.attention import entropy_kernel
from toprovar.flops import linear_flops_per_token, trace_flops
from toprovar.pipeline import generate
from toprovar.policy import policy_from_dict
from toprovar.pruning import Pruner, as_pruner, stages
from toprovar.pruning.fastvar import frequency_scores, top_tokens


def test_low_entropy_ratio_counts_tokens_below_the_mean() -> None:
    H = torch.rand(3, 50)
    expected = torch.tensor([(row < row.mean()).sum().item() / 50 for row in H])
    assert torch.allclose(stages.low_entropy_ratio(H), expected)
    assert stages.crosses(0.3, 0.4, "below") and not stages.crosses(0.5, 0.4, "below")
    assert stages.crosses(0.5, 0.4, "above") and not stages.crosses(0.3, 0.4, "above")


def test_principal_ratio_separates_rank_one_from_noise() -> None:
    u, v = torch.rand(8, 1) + 0.5, torch.rand(1, 8) + 0.5
    global_map = (u @ v)[None] + 1e-3 * torch.rand(1, 8, 8)  # one dominant component
    detail_map = torch.randn(1, 8, 8)
    g, d = stages.principal_ratio(global_map), stages.principal_ratio(detail_map)
    assert g.item() > 50 and d.item() < 5
    R = stages.layer_score(torch.cat([g, d]), beta=1.0)
    assert R[0] < 1e-6 and 0 < R[1] <= 1
    assert math.isinf(stages.principal_ratio(torch.rand(2, 1, 5))[0].item())


def test_normalizations() -> None:
    H = torch.rand(2, 40) + 0.1
    assert torch.allclose(stages.normalize_entropy(H, "mean").mean(-1), torch.ones(2))
    assert torch.allclose(stages.normalize_entropy(H, "sum").sum(-1), torch.ones(2))
    rank = stages.normalize_entropy(H, "rank")
    assert torch.equal(torch.argsort(rank, -1), torch.argsort(H, -1))
    assert rank.min() == 0 and rank.max() == 1


def test_keep_probability_matches_eq6_and_orders_by_entropy() -> None:
    H = torch.rand(1, 30) + 0.1
    H_hat = stages.normalize_entropy(H, "mean")
    R = torch.tensor([0.0, 0.5, 1.0])
    p = stages.keep_probability(H_hat, R, phi=0.8, alpha_min=0.1, alpha_max=0.7)
    q = (0.8 * R[:, None, None] * H_hat).clamp(0, 1)
    assert torch.allclose(p, 1 - (0.1 + 0.6 * q).clamp(0, 1))
    assert torch.allclose(p[0], torch.full_like(p[0], 0.9))  # Global layer: only α_min pruned
    counts = stages.keep_counts(p, min_keep=5)
    assert counts[0] >= counts[1] >= counts[2] >= 5
    order = stages.keep_order(H)
    kept = stages.keep_indices(order, 10)
    assert torch.all(kept[0, 1:] > kept[0, :-1])  # sorted positions
    assert H[0, kept[0]].max() <= H[0, order[0, 10:]].min()  # the lowest-entropy tokens


def test_fastvar_keeps_tokens_far_from_the_mean() -> None:
    x = torch.randn(2, 20, 8) * 0.01
    x[0, 3] += 5.0
    x[1, 17] -= 5.0
    kept = top_tokens(frequency_scores(x), 4)
    assert 3 in kept[0] and 17 in kept[1] and kept.shape == (2, 4)


def _toprovar(**over):
    doc = {
        "method": "toprovar",
        "scale": {"tau": 0.55, "crossing": "below", "min_scale": 4},
        "token": {"alpha_min": 0.2, "alpha_max": 0.8},
    }
    doc.update(over)
    return policy_from_dict(doc)


@pytest.mark.parametrize("policy", ["none", "policy_none", "loaded_none"])
def test_policy_none_is_bit_identical(small, policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue item 5: policy none is the plain pipeline, bit for bit, in every form it can be given."""
    from tests.test_pipeline_pinning import PINNED, record_logits
    from toprovar.policy import load_policy

    given = {
        "none": "none",
        "policy_none": policy_from_dict({"method": "none"}),
        "loaded_none": load_policy("none", "test-small"),
    }[policy]
    seeds = torch.randint(0, 2**31 - 1, (2,)).tolist()
    plain = generate(small, ["a red cube", "a blue ball"], seeds)  # no policy argument at all
    none = generate(small, ["a red cube", "a blue ball"], seeds, policy=given)
    assert torch.equal(plain.images, none.images)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, none.bits))
    # Nothing pruned, skipped or exited, and the trace says so.
    layers = none.trace.layers_frame()
    assert len(layers) == len(none.trace.scales) * small.transformer.depth and (layers.kept == layers.tokens).all()
    assert not none.trace.to_frame().exited.any() and none.trace.pruning == {}
    executed, unpruned = trace_flops(none.trace)
    assert executed == unpruned
    # And "plain" is the pipeline pinned right after its check against the official Infinity code.
    seen = record_logits(monkeypatch)
    pinned = generate(small, ["a red cube on the grass"], [7], policy=given)
    pin = PINNED["test-small"]
    assert [int(b.sum()) for b in pinned.bits] == pin["bits_sum"]
    torch.testing.assert_close(
        torch.tensor([float(logits.abs().mean()) for logits in seen]),
        torch.tensor(pin["abs_mean"]),
        rtol=1e-4,
        atol=2e-6,
    )


def test_toprovar_prunes_from_D_on_deterministically(small) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    runs = [generate(small, ["a red cube"], [seed], pixels="0.25M", policy=_toprovar()) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images)
    trace = runs[0].trace
    D = trace.pruning["D"]
    assert D is not None and D >= 4
    rho = trace.to_frame()["rho"]
    assert rho[D] <= 0.55 and all(r > 0.55 for r in rho[4:D])
    layers = trace.layers_frame()
    before = layers[layers.scale < D]
    after = layers[(layers.scale > D) & (layers.layer >= 1)]
    assert (before.kept == before.tokens).all()
    assert (after.kept < after.tokens).all() and (after.kept >= (0.1 * after.tokens).apply(math.ceil)).all()
    assert (layers[layers.layer == 0].kept == layers[layers.layer == 0].tokens).all()  # entropy probe
    executed, unpruned = trace_flops(trace)
    assert executed < unpruned
    assert layers.flops_executed.sum() == pytest.approx(executed)


def test_scale_exit_and_fixed_exit_stop_refining(small) -> None:
    scale_only = generate(
        small,
        ["a cube"],
        [3],
        pixels="0.25M",
        policy=_toprovar(variant="scale", scale={"tau": 0.55, "action": "exit", "min_scale": 4}),
    )
    D = scale_only.trace.pruning["D"]
    frame = scale_only.trace.to_frame()
    assert D is not None and frame.exited[D + 1 :].all() and not frame.exited[: D + 1].any()
    assert len(scale_only.bits) == D + 1
    fixed = generate(
        small,
        ["a cube"],
        [3],
        pixels="0.25M",
        policy=policy_from_dict({"method": "fixed_exit", "fixed_exit": {"exit_scale": 5}}),
    )
    assert len(fixed.bits) == 6 and fixed.images.shape == scale_only.images.shape


def test_fastvar_prunes_configured_scales_and_layers(small) -> None:
    policy = policy_from_dict({"method": "fastvar", "fastvar": {"ratios": {7: 0.4, 8: 1.0}, "layers": [1, 2]}})
    res = generate(small, ["a red cube"], [5], pixels="0.25M", policy=policy)
    layers = res.trace.layers_frame().set_index(["scale", "layer"])
    n7, n8 = layers.loc[(7, 1), "tokens"], layers.loc[(8, 1), "tokens"]
    assert layers.loc[(7, 1), "kept"] == n7 - int(n7 * 0.4)
    assert layers.loc[(8, 1), "kept"] == 0 and n8 > 0
    assert layers.loc[(7, 0), "kept"] == n7 and layers.loc[(9, 1), "kept"] == layers.loc[(9, 1), "tokens"]
    base = generate(small, ["a red cube"], [5], pixels="0.25M")
    assert not torch.equal(base.images, res.images)


def test_flops_of_an_unpruned_run_follow_the_formula(small) -> None:
    res = generate(small, ["a cube"], [1])
    cfg = small.transformer.config
    executed, unpruned = trace_flops(res.trace)
    assert executed == unpruned
    tokens = [s.tokens for s in res.trace.scales]
    prefix = [sum(tokens[: i + 1]) for i in range(len(tokens))]
    per_layer = sum(
        linear_flops_per_token(cfg.embed_dim, cfg.ffn_hidden) * n + 4 * cfg.embed_dim * n * p
        for n, p in zip(tokens, prefix)
    )
    assert unpruned == pytest.approx(2 * small.transformer.depth * per_layer)


class _EndCapture(Pruner):
    """Wraps a ToProVAR pruner: keeps x before/after its end_scale at every scale (copies)."""

    def __init__(self, policy):
        from toprovar.pruning.toprovar import ToProVARPruner

        self.inner = ToProVARPruner(policy)
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.plans: dict[int, dict[int, torch.Tensor]] = {}
        self.static: dict[int, int | None] = {}
        self.deltas_at: dict[int, dict[int, torch.Tensor]] = {}

    def begin(self, ctx):
        self.inner.begin(ctx)

    def exit_before_scale(self, si):
        self.static[si] = self.inner.static_plan(si)
        self.deltas_at[si] = dict(self.inner.deltas)
        return self.inner.exit_before_scale(si)

    def wants_entropy(self, si, li):
        return self.inner.wants_entropy(si, li)

    def keep_tokens(self, si, li, x):
        return self.inner.keep_tokens(si, li, x)

    def observe(self, si, li, entropy):
        self.inner.observe(si, li, entropy)

    def end_scale(self, si, x):
        self.before[si] = x.clone()
        self.plans[si] = dict(self.inner.plan) if si == self.inner.plan_scale else {}
        self.inner.end_scale(si, x)
        self.after[si] = x.clone()


class _UpdateRecorder(Pruner):
    """Unpruned run that records every block's update (output - input) per scale."""

    def begin(self, ctx):
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.depth = ctx.depth

    def exit_before_scale(self, si):
        return False

    def wants_entropy(self, si, li):
        return False

    def keep_tokens(self, si, li, x):
        self.inputs[si, li] = x.clone()
        return None

    def observe(self, si, li, entropy):
        pass

    def end_scale(self, si, x):
        self.inputs[si, self.depth] = x.clone()

    def update(self, si, li):
        return self.inputs[si, li + 1] - self.inputs[si, li]


def test_cached_restore_adds_the_skipped_layers_updates_of_the_cache_scale(small) -> None:
    """token.restore=cached: pruned tokens get, after the scale's last block, the sum of the updates
    their skipped layers made at the last unpruned scale (D - 1), area-resized; kept tokens and the
    plan itself are untouched; the plan stays static (captured) after D."""
    import torch.nn.functional as F

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    policy = _toprovar(token={"alpha_min": 0.2, "alpha_max": 0.8, "restore": "cached"})
    plain_policy = _toprovar()
    cap, plain = _EndCapture(policy), _EndCapture(plain_policy)
    res = generate(small, ["a red cube"], [seed], pixels="0.25M", policy=cap)
    ref = generate(small, ["a red cube"], [seed], pixels="0.25M", policy=plain)
    D = res.trace.pruning["D"]
    assert D is not None and D == ref.trace.pruning["D"] and D >= 4
    # Same decisions (restoring does not feed back into this scale's plan or its blocks).
    assert (
        res.trace.layers_frame().kept.tolist()[: (D + 1) * small.transformer.depth]
        == ref.trace.layers_frame().kept.tolist()[: (D + 1) * small.transformer.depth]
    )
    torch.testing.assert_close(cap.before[D], plain.before[D], rtol=0, atol=0)
    assert torch.equal(plain.after[D], plain.before[D])  # restore none: end_scale changes nothing

    recorder = _UpdateRecorder()
    generate(small, ["a red cube"], [seed], pixels="0.25M", policy=recorder)
    schedule = res.trace.schedule
    _, h, w = schedule[D]
    _, hc, wc = schedule[D - 1]
    expected = torch.zeros_like(cap.before[D])
    for li, keep in cap.plans[D].items():
        update = recorder.update(D - 1, li)  # (rows, hc*wc, C) of the unpruned run
        grid = update.transpose(1, 2).reshape(update.shape[0], -1, hc, wc)
        fill = F.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2)
        pruned = torch.ones(expected.shape[:2], dtype=torch.bool)
        pruned[torch.arange(keep.shape[0])[:, None], keep] = False
        expected += fill * pruned[..., None]
    assert cap.plans[D] and expected.abs().sum() > 0
    torch.testing.assert_close(cap.after[D] - cap.before[D], expected, rtol=1e-4, atol=1e-5)
    # Static plans: the scales that may still be the cache scale record (None); later pruned scales
    # follow a fixed plan after the probe layer.
    assert cap.static[D] is None and all(cap.static[s] == 1 for s in range(D + 1, len(schedule)))
    # online layer scores: every layer observed at the representative scale, all of them probe
    # layers of one unit (it lies before min_scale here)
    rep, depth = res.trace.pruning["representative_scale"], small.transformer.depth
    assert rep < policy.scale.min_scale
    assert all(cap.static[s] == (depth if s == rep else 1) for s in range(0, policy.scale.min_scale - 1))
    assert plain.static == {s: (depth if s == rep else 1) for s in range(len(schedule))}
    # Deterministic, and it changes the image.
    again = generate(small, ["a red cube"], [seed], pixels="0.25M", policy=policy)
    assert torch.equal(again.images, res.images) and not torch.equal(res.images, ref.images)


def test_cached_layer_restore_runs_eagerly_and_fixed_cache_scale(small) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    layer = _EndCapture(_toprovar(token={"alpha_min": 0.2, "alpha_max": 0.8, "restore": "cached_layer"}))
    res = generate(small, ["a blue ball"], [seed], pixels="0.25M", policy=layer)
    assert all(v is None for v in layer.static.values())
    ends = _EndCapture(_toprovar(token={"alpha_min": 0.2, "alpha_max": 0.8, "restore": "cached"}))
    other = generate(small, ["a blue ball"], [seed], pixels="0.25M", policy=ends)
    D = res.trace.pruning["D"]
    # test-small has 2 blocks: the only planned block (1) is the last, so restoring right after it
    # or after the scale is the same update at the same point, and the same images follow.
    assert D is not None and layer.plans[D] and torch.equal(layer.after[D], ends.after[D])
    assert torch.equal(res.images, other.images)
    # A fixed cache scale records there only; scale 2 is earlier than min_scale - 1.
    fixed = _EndCapture(_toprovar(token={"alpha_min": 0.2, "alpha_max": 0.8, "restore": "cached", "cache_scale": 2}))
    generate(small, ["a blue ball"], [seed], pixels="0.25M", policy=fixed)
    assert fixed.static[2] is None and fixed.static[1] == 1 and fixed.static[D] == 1  # (3: representative)
    _, hc, wc = res.trace.schedule[2]
    assert set(fixed.deltas_at[D]) == set(range(small.transformer.depth))
    assert all(d.shape[-2:] == (hc, wc) for d in fixed.deltas_at[D].values())


def test_keep_index_table_equals_one_sort_per_count() -> None:
    """The batched plan (one rank + cumulative sum for every layer) is `keep_indices` per count,
    repeated for the CFG rows, including counts 0 and N and repeated counts; views of one tensor."""
    gen = torch.Generator().manual_seed(11)
    for n in (1, 7, 50):
        H = torch.rand(3, n, generator=gen)
        H[:, ::3] = 0.5  # ties: broken by position
        order = stages.keep_order(H)
        counts = [0, n, *torch.randint(0, n + 1, (6,), generator=gen).tolist(), n // 2, n // 2]
        table = stages.keep_index_table(order, torch.tensor(counts), repeat=2)
        got = [table[i, :, :k] for i, k in enumerate(counts)]
        for k, g in zip(counts, got):
            want = (stages.keep_indices(order, k) if k else order[:, :0]).repeat(2, 1)
            assert torch.equal(g, want), (n, k)
        assert len({g._base.data_ptr() for g in got if g._base is not None}) == 1


def _edge_scores_loop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Plain-loop reference of stages.edge_scores."""
    b, n, c = x.shape
    grid = x.float().reshape(b, h, w, c)
    own = torch.zeros(b, h, w)
    for i in range(h):
        for j in range(w):
            window = [
                grid[:, min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
                for di in (-1, 0, 1)
                for dj in (-1, 0, 1)
            ]
            own[:, i, j] = (grid[:, i, j] - torch.stack(window).mean(0)).pow(2).sum(-1)
    spread = torch.zeros(b, h, w)
    for i in range(h):
        for j in range(w):
            spread[:, i, j] = own[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].amax(dim=(1, 2))
    return (spread + 1e-3 * own).reshape(b, n)


def test_edge_scores_match_the_loop_reference() -> None:
    x = torch.randn(2, 5 * 7, 6)
    torch.testing.assert_close(stages.edge_scores(x, 5, 7), _edge_scores_loop(x, 5, 7), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="5x6 grid"):
        stages.edge_scores(x, 5, 6)


def test_edge_order_prefers_a_boundary_over_a_smooth_gradient() -> None:
    """A square on a strong linear gradient: `frequency` ranks the gradient's far corners first,
    `edge` ranks the square's boundary (and the tokens beside it) first."""
    h = w = 12
    ramp = torch.linspace(-6, 6, w).expand(h, w)
    grid = torch.stack([ramp, torch.zeros(h, w)], -1).clone()  # (h, w, 2): gradient in channel 0
    grid[5:7, 5:7, 1] = 2.0  # a 2x2 object in channel 1
    x = grid.reshape(1, h * w, 2)
    object_ring = {i * w + j for i in range(4, 8) for j in range(4, 8)}  # the object and its neighbours
    top_edge = set(top_tokens(stages.edge_scores(x, h, w), 16)[0].tolist())
    top_freq = set(top_tokens(frequency_scores(x), 16)[0].tolist())
    assert top_edge == object_ring
    assert not top_freq & {i * w + j for i in range(5, 7) for j in range(5, 7)}


# -- the pruner contract: acts_at(si) False means the scale runs exactly as unpruned ---------------


class _HookLog(Pruner):
    """Delegates every hook and property to `inner` and logs, per scale, what the hooks did: entropy
    wanted, tokens removed (a keep list shorter than the scale), hidden states changed in place
    (keep_tokens, end_scale). `skip_idle=True` behaves as a loop that trusts `acts_at`: at a scale
    where it is False only `end_scale` is called (no entropy, every token)."""

    def __init__(self, inner: Pruner, skip_idle: bool = False):
        super().__init__(inner.skip_uncond_from_scale)
        self.inner, self.skip_idle = inner, skip_idle
        self.acts: dict[int, bool] = {}
        self.did: dict[int, set[str]] = {}
        self.ends: dict[int, torch.Tensor] = {}  # the hidden states after each scale's last block

    @property
    def plans_statically(self) -> bool:
        return self.inner.plans_statically

    def _log(self, si: int, what: str) -> None:
        self.did.setdefault(si, set()).add(what)

    def _idle(self, si: int) -> bool:
        return self.skip_idle and not self.acts[si]

    def begin(self, ctx) -> None:
        self.inner.begin(ctx)

    def exit_before_scale(self, si: int) -> bool:
        stop = self.inner.exit_before_scale(si)
        if not stop:
            self.acts[si] = self.inner.acts_at(si)
        return stop

    def acts_at(self, si: int) -> bool:
        return self.inner.acts_at(si)

    def static_plan(self, si: int) -> int | None:
        return self.inner.static_plan(si)

    def wants_entropy(self, si: int, li: int) -> bool:
        if self._idle(si):
            return False
        want = self.inner.wants_entropy(si, li)
        if want:
            self._log(si, "entropy")
        return want

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._idle(si):
            return None
        before = x.clone()
        keep = self.inner.keep_tokens(si, li, x)
        if keep is not None and keep.shape[1] < x.shape[1]:
            self._log(si, "pruned")
        if not torch.equal(before, x):
            self._log(si, "changed x")
        return keep

    def observe(self, si: int, li: int, entropy: torch.Tensor) -> None:
        self.inner.observe(si, li, entropy)

    def end_scale(self, si: int, x: torch.Tensor) -> None:
        before = self.ends[si] = x.clone()
        self.inner.end_scale(si, x)
        if not torch.equal(before, x):
            self._log(si, "changed x")


def _contract_pruners():
    from toprovar.pruning import as_pruner

    token = {"alpha_min": 0.2, "alpha_max": 0.8}
    return {
        "toprovar online R, cached": lambda: as_pruner(
            _toprovar(token={**token, "restore": "cached"}, layer={"mode": "online"})
        ),
        "toprovar static R, edge": lambda: as_pruner(
            _toprovar(token={**token, "order": "edge", "restore": "cached"}, layer={"ratios": [3.0, 1.2]})
        ),
        "toprovar cache_scale 1, representative 2": lambda: as_pruner(
            _toprovar(token={**token, "restore": "cached", "cache_scale": 1}, layer={"representative_scale": 2})
        ),
        "toprovar exit": lambda: as_pruner(
            _toprovar(variant="scale", scale={"tau": 0.55, "action": "exit", "min_scale": 4})
        ),
        "fastvar per_block": lambda: as_pruner(
            policy_from_dict({"method": "fastvar", "fastvar": {"ratios": {7: 0.4, 8: 1.0}, "layers": [1, 2]}})
        ),
        "fastvar per_scale": lambda: as_pruner(
            policy_from_dict(
                {"method": "fastvar", "fastvar": {"ratios": {6: 0.5}, "layers": [1, 2], "plan": "per_scale"}}
            )
        ),
        "fixed exit": lambda: as_pruner(policy_from_dict({"method": "fixed_exit", "fixed_exit": {"exit_scale": 5}})),
        "none": lambda: as_pruner("none"),
    }


@pytest.mark.parametrize("name", list(_contract_pruners()))
def test_acts_at_false_means_the_hooks_change_nothing(small, name: str) -> None:
    """At every scale where `acts_at` is False no hook wanted entropy, removed a token or touched the
    hidden states; and a loop that skips the hooks there (only `end_scale`) draws the same images."""
    make = _contract_pruners()[name]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    log = _HookLog(make())
    ref = generate(small, ["a red cube", "a blue ball"], [seed, seed + 1], pixels="0.25M", policy=log)
    idle = [si for si, acts in log.acts.items() if not acts]
    assert idle, f"{name}: acts everywhere (the check would be vacuous)"
    assert {si: log.did.get(si) for si in idle} == {si: None for si in idle}
    if name not in ("fixed exit", "none"):  # they act nowhere; every other one acts somewhere
        assert any(log.did.get(si) for si in log.acts)
    skipping = _HookLog(make(), skip_idle=True)
    run = generate(small, ["a red cube", "a blue ball"], [seed, seed + 1], pixels="0.25M", policy=skipping)
    assert torch.equal(run.images, ref.images) and run.trace.pruning == ref.trace.pruning
    assert run.trace.layers_frame().kept.tolist() == ref.trace.layers_frame().kept.tolist()


def test_acts_at_and_static_plans_of_each_pruner(small) -> None:
    """Where each pruner acts, on test-small at 0.25M, and which ones plan statically."""
    from calibrate.probes import EntropyRecorder
    from toprovar.pruning.recording import KeptTokenRecorder

    pruners = {name: make() for name, make in _contract_pruners().items()}
    logs = {name: _HookLog(p) for name, p in pruners.items()}
    for log in logs.values():
        generate(small, ["a cube"], [3], pixels="0.25M", policy=log)
    acting = {name: sorted(si for si, acts in log.acts.items() if acts) for name, log in logs.items()}
    n = len(logs["none"].acts)
    # min_scale 4: representative and recording scale 3 (min_scale - 1), then every scale.
    assert acting["toprovar online R, cached"] == list(range(3, n))
    assert acting["toprovar static R, edge"] == list(range(3, n))  # static R: records at 3 only
    assert acting["toprovar cache_scale 1, representative 2"] == [1, 2, *range(4, n)]
    assert acting["toprovar exit"][0] == 4  # then up to D, where it exits
    assert acting["fastvar per_block"] == [6, 7, 8]  # cache scale 6 = first pruned - 1
    assert acting["fastvar per_scale"] == [5, 6]
    assert acting["fixed exit"] == acting["none"] == []
    statically = {name: p.plans_statically for name, p in pruners.items()}
    assert statically == {**dict.fromkeys(statically, True), "fastvar per_block": False, "none": False}
    assert KeptTokenRecorder(pruners["fastvar per_block"]).plans_statically is False
    assert KeptTokenRecorder(pruners["fixed exit"]).plans_statically is True
    assert EntropyRecorder().plans_statically and EntropyRecorder().acts_at(0)


def test_a_policy_that_prunes_nothing_runs_the_unpruned_numbers(small) -> None:
    """ToProVAR reading entropy at every scale from 1 on (probe layer, online layer scores at the
    representative scale, cached updates recorded) but never crossing τ: its attention with entropy
    is SDPA's own output (`toprovar.attention`, kernel "beside"), so every scale's hidden states,
    and the bits, are the unpruned ones (with the "fae" kernel they are not)."""
    never = _toprovar(
        scale={"tau": 1.0, "crossing": "above", "min_scale": 1},
        layer={"mode": "online"},
        token={"alpha_min": 0.2, "alpha_max": 0.8, "restore": "cached"},
    )
    seeds = torch.randint(0, 2**31 - 1, (2,)).tolist()
    plain = _HookLog(as_pruner("none"))
    ref = generate(small, ["a red cube", "a blue ball"], seeds, policy=plain)
    log = _HookLog(as_pruner(never))
    res = generate(small, ["a red cube", "a blue ball"], seeds, policy=log)
    assert res.trace.pruning["D"] is None and all(r.rho is not None for r in res.trace.scales[1:])
    assert all("entropy" in log.did.get(si, ()) for si in range(1, len(res.trace.scales)))
    assert all(torch.equal(plain.ends[si], log.ends[si]) for si in plain.ends)
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, res.bits)) and torch.equal(ref.images, res.images)
    fae = _HookLog(as_pruner(never))
    with entropy_kernel("fae"):
        generate(small, ["a red cube", "a blue ball"], seeds, policy=fae)
    assert not all(torch.equal(plain.ends[si], fae.ends[si]) for si in plain.ends)


@pytest.mark.parametrize(
    "doc, where, allowed",
    [
        ({"method": "toprovar", "scale": {"min_scale": 7}}, "scale.min_scale: got 7", "[0, 6]"),
        ({"method": "toprovar", "layer": {"ratios": [1.5, 2.0, 3.0]}}, "layer.ratios: got 3 values", "expected 2"),
        ({"method": "toprovar", "token": {"protect_layers": 2}}, "token.protect_layers: got 2", "[1, 1]"),
        (
            {"method": "fastvar", "fastvar": {"ratios": {7: 0.5}, "layers": [1, 2]}},
            "fastvar.ratios: got key 7",
            "[0, 6]",
        ),
        ({"method": "fastvar", "fastvar": {"ratios": {5: 0.5}, "layers": [1, 3]}}, "fastvar.layers", "end <= 2"),
        ({"method": "fixed_exit", "fixed_exit": {"exit_scale": 9}}, "fixed_exit.exit_scale: got 9", "[0, 6]"),
        ({"method": "none", "guidance": {"skip_uncond_from_scale": 7}}, "skip_uncond_from_scale: got 7", "[0, 6]"),
    ],
)
def test_a_policy_past_the_runs_scales_or_layers_is_refused_by_generate(small, tmp_path, doc, where, allowed) -> None:
    """Issue 22: the Python API loads a policy path without a backbone; the pruner refuses what the
    call's schedule (7 scales) and depth (2) do not have, in one line, before any scale runs (it
    ran unpruned: a scale past the schedule is never reached)."""
    import yaml

    from toprovar.errors import UserError

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    log = _HookLog(as_pruner(str(path)))
    with pytest.raises(UserError) as err:
        generate(small, ["a red cube"], [1], policy=log)
    message = str(err.value)
    assert where in message and allowed in message and "'test-small'" in message and "\n" not in message
    assert log.acts == {} and log.ends == {}  # no scale ran

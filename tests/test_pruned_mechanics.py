"""Host synchronization of ToProVAR's planned scales (`FastOptions.host_plan`), on CPU.

A host sync on the GPU is a device value read on the host (`tolist`, `item`, `float(t)`,
`int(t)`); on CPU the same reads happen, so counting them in the pruner's hooks counts the syncs
the GPU would make.
"""

from __future__ import annotations

import math

import pytest
import torch

from toprovar.fast import FastOptions, release_fast_runtime
from toprovar.pipeline import generate
from toprovar.pruning import stages
from toprovar.pruning.hooks import Pruner
from toprovar.pruning.toprovar import ToProVARPruner, fixed_keep_counts


def _fixed_policy(depth: int, min_scale: int, alpha_min: float, alpha_max: float, **token):
    from dataclasses import replace

    from benchmarks.pruning import fixed_policy

    policy = fixed_policy(depth, min_scale=min_scale, alpha=alpha_min, protect_layers=1)
    return replace(policy, token=replace(policy.token, alpha_max=alpha_max, **token))


class HostReads(Pruner):
    """Delegates every hook to a ToProVAR pruner and counts, per scale, the device values its hooks
    read on the host."""

    def __init__(self, pruner: ToProVARPruner, monkeypatch: pytest.MonkeyPatch):
        self.pruner, self.scale, self.inside, self.reads = pruner, -1, False, {}
        for name in ("tolist", "item", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                if self.inside:
                    self.reads[self.scale] = self.reads.get(self.scale, 0) + 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def _hook(self, name: str, *args):
        self.inside = True
        try:
            return getattr(self.pruner, name)(*args)
        finally:
            self.inside = False

    def begin(self, ctx) -> None:  # before the loop (the policy's layer scores into the trace): not counted
        self._hook("begin", ctx)
        self.reads.clear()

    def exit_before_scale(self, si: int) -> bool:
        self.scale = si
        return self._hook("exit_before_scale", si)

    @property
    def plans_statically(self) -> bool:
        return self.pruner.plans_statically

    def acts_at(self, si: int) -> bool:
        return self._hook("acts_at", si)

    def static_plan(self, si: int):
        return self._hook("static_plan", si)

    def wants_entropy(self, si: int, li: int) -> bool:
        return self._hook("wants_entropy", si, li)

    def keep_tokens(self, si: int, li: int, x):
        return self._hook("keep_tokens", si, li, x)

    def observe(self, si: int, li: int, entropy) -> None:
        self._hook("observe", si, li, entropy)

    def end_scale(self, si: int, x) -> None:
        self._hook("end_scale", si, x)


def test_host_plan_reads_the_device_only_for_decisions(small, monkeypatch: pytest.MonkeyPatch) -> None:
    """α_min = α_max (counts fixed by the policy), D = min_scale = 3 on any model: with host_plan the
    hooks read the device once at scale 3 (ρ_s for the crossing test) and once after the last
    scale's blocks (every later ρ_s, for the trace); without it once at every scale from min_scale
    on (before it no decision reads the entropy, so none is computed). Same images."""
    depth, n_scales = small.transformer.depth, 7
    policy = _fixed_policy(depth, 3, 0.5, 0.5)
    runs = {}
    for host_plan in (False, True):
        spy = HostReads(ToProVARPruner(policy), monkeypatch)
        runs[host_plan] = (
            generate(small, ["a red cube"], [3], policy=spy, fast=FastOptions(host_plan=host_plan)),
            spy.reads,
        )
    assert runs[False][1] == {si: 1 for si in range(3, n_scales)}  # no entropy, no ρ_s before min_scale
    assert runs[True][1] == {3: 1, n_scales - 1: 1}
    (a, _), (b, _) = runs[False], runs[True]
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.images, b.images)
    assert [s.rho for s in a.trace.scales] == [s.rho for s in b.trace.scales]
    assert [s.rho is not None for s in b.trace.scales] == [si >= 3 for si in range(n_scales)]
    assert a.trace.layers_frame()["kept"].tolist() == b.trace.layers_frame()["kept"].tolist()
    release_fast_runtime(small)


def test_host_plan_keeps_the_sync_where_counts_follow_the_entropy(small, monkeypatch) -> None:
    """α_min < α_max: the counts depend on the entropy, so every pruned scale still reads them
    (and ρ_s with them); the scales before D = min_scale compute no entropy and read nothing."""
    policy = _fixed_policy(small.transformer.depth, 3, 0.2, 0.7)
    spy = HostReads(ToProVARPruner(policy), monkeypatch)
    res = generate(small, ["a red cube"], [5], policy=spy, fast=FastOptions(host_plan=True))
    assert spy.reads == {3: 1, 4: 1, 5: 1, 6: 1}  # ρ_s with each plan; none deferred
    plain = generate(small, ["a red cube"], [5], policy=policy, fast=False)
    assert [s.rho for s in plain.trace.scales] == [s.rho for s in res.trace.scales]
    assert all(torch.equal(x, y) for x, y in zip(plain.bits, res.bits))
    release_fast_runtime(small)


def test_plan_shares_one_row_per_count(small) -> None:
    """Layers with the same keep count get the same view (same tokens): the block chain keeps them
    gathered. Checked on the recorded plan of a policy where every gated layer keeps the same count."""
    from toprovar.pruning.recording import KeptTokenRecorder

    depth = small.transformer.depth
    rec = KeptTokenRecorder(ToProVARPruner(_fixed_policy(depth, 3, 0.5, 0.5)))
    generate(small, ["a red cube"], [1], policy=rec, fast=FastOptions(host_plan=True))
    for si in range(3, 7):
        keeps = [rec.index[(si, li)] for li in range(1, depth) if (si, li) in rec.index]
        assert keeps and all(k.data_ptr() == keeps[0].data_ptr() and k.shape == keeps[0].shape for k in keeps)


@pytest.mark.parametrize("round_", range(5))
def test_fixed_keep_counts_equal_the_device_counts(round_: int) -> None:
    """The host's counts (`fixed_keep_counts`) are `_plan_counts`'s on any entropy when α_min = α_max,
    with and without token gating and skipped layers (fresh random shapes and values)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    for _ in range(20):
        n = int(torch.randint(1, 5000, (), generator=gen))
        batch, depth = int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(2, 40, (), generator=gen))
        alpha = round(float(torch.rand((), generator=gen)), 4)
        R = stages.layer_score(torch.rand(depth, generator=gen) * 5 + 1, float(torch.rand((), generator=gen)) * 3)
        phi = float(torch.randint(1, 14, (), generator=gen)) / 13
        min_keep = math.ceil(float(torch.rand((), generator=gen)) * 0.3 * n)
        H = torch.rand(batch, n, generator=gen) * 4
        for mode in ("mean", "sum", "rank"):
            p_keep = stages.keep_probability(stages.normalize_entropy(H, mode), R, phi, alpha, alpha)
            device = stages.keep_counts(p_keep, min_keep)
            skip = torch.where(R >= 0.5, torch.zeros_like(device), device)
            R_host = tuple(float(v) for v in R.tolist())
            assert list(fixed_keep_counts(n, batch, R_host, phi, alpha, min_keep, None)) == device.tolist()
            assert list(fixed_keep_counts(n, batch, R_host, phi, alpha, min_keep, 0.5)) == skip.tolist()
        assert list(fixed_keep_counts(n, batch, R_host, phi, None, min_keep, None)) == [n] * depth

"""The generation loop on the small test backbones: outputs, seeds, CFG, pruner hooks, errors."""

from __future__ import annotations

import pytest
import torch

from toprovar.errors import UserError
from toprovar.models.registry import build_backbone
from toprovar.pipeline import generate
from toprovar.pruning import NoPruner, Pruner, PrunerContext
from toprovar.schedules import scale_schedule


def _seeds(n: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def test_outputs_shapes_and_trace(small) -> None:
    seeds = _seeds(2)
    res = generate(small, ["a red cube", "two blue balls on the grass"], seeds)
    schedule = scale_schedule(1.0, "0.06M")
    _, h, w = schedule[-1]
    assert res.images.dtype == torch.uint8 and res.images.shape == (2, 4 * h, 4 * w, 3)  # test VAE: 4 px/cell
    assert [tuple(b.shape) for b in res.bits] == [(2, hh * ww, 6) for _, hh, ww in schedule]
    assert all(set(b.unique().tolist()) <= {0, 1} for b in res.bits)
    frame = res.trace.to_frame()
    assert list(frame["tokens"]) == [hh * ww for _, hh, ww in schedule]
    assert (frame["time_ms"] > 0).all() and not frame["exited"].any()
    assert len(res.trace.layers) == len(schedule) * small.transformer.depth
    assert res.trace.text_encode_ms >= 0 and res.trace.decode_ms > 0


def test_seed_alone_or_in_batch_gives_same_bits(small) -> None:
    s = _seeds(3)
    prompts = ["a red cube", "a green sphere left of a cube", "two cats"]
    batch = generate(small, prompts, s)
    alone = generate(small, prompts[1:2], s[1:2])
    again = generate(small, prompts, s)
    assert all(torch.equal(a[1:2], b) for a, b in zip(batch.bits, alone.bits))
    assert all(torch.equal(a, b) for a, b in zip(batch.bits, again.bits))
    assert torch.equal(batch.images, again.images)
    other = generate(small, prompts[1:2], [s[1] + 1])
    assert any(not torch.equal(a, b) for a, b in zip(alone.bits, other.bits))


def test_patchify_backbone_generates(patchify) -> None:
    res = generate(patchify, ["a blue cube"], _seeds(1), h_div_w=0.5)
    _, h, w = scale_schedule(0.5, "0.06M")[-1]
    assert res.images.shape == (1, 2 * 4 * h, 2 * 4 * w, 3)  # 2x2 latent cells per token
    assert res.bits[-1].shape == (1, h * w, 24)


def test_guidance_scale_one_drops_unconditional_rows(small) -> None:
    seen: list[int] = []

    class Rows(NoPruner):
        def begin(self, ctx: PrunerContext) -> None:
            seen.append(ctx.rows)

    generate(small, ["a cube"], [1], guidance_scale=1.0, policy=Rows())
    generate(small, ["a cube"], [1], guidance_scale=[1.0] * 6 + [2.0], policy=Rows())
    assert seen == [1, 2]


class KeepAll(Pruner):
    """Asks for every token explicitly and for entropy everywhere."""

    def __init__(self) -> None:
        self.observed: list[tuple[int, int, tuple[int, ...]]] = []

    def wants_entropy(self, si: int, li: int) -> bool:
        return True

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(x.shape[1]).expand(x.shape[0], -1)

    def observe(self, si: int, li: int, entropy: torch.Tensor) -> None:
        self.observed.append((si, li, tuple(entropy.shape)))


def test_keep_all_pruner_matches_no_pruner(small) -> None:
    s = _seeds(2)
    base = generate(small, ["a red cube", "a cat"], s)
    pruner = KeepAll()
    kept = generate(small, ["a red cube", "a cat"], s, policy=pruner)
    assert all(torch.equal(a, b) for a, b in zip(base.bits, kept.bits))
    assert torch.equal(base.images, kept.images)
    schedule = scale_schedule(1.0, "0.06M")
    assert len(pruner.observed) == len(schedule) * 2
    assert pruner.observed[-1] == (len(schedule) - 1, 1, (4, 2, schedule[-1][1] * schedule[-1][2]))


class HalfTokensSkipLayer(Pruner):
    """From scale 3: layer 0 skipped, layer 1 on the first half of the tokens; exit before scale 6."""

    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        if si < 3:
            return None
        k = 0 if li == 0 else x.shape[1] // 2
        return torch.arange(k).expand(x.shape[0], -1)

    def exit_before_scale(self, si: int) -> bool:
        return si == 6


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_pruning_hooks_shape_the_run(small, kv_policy: str) -> None:
    s = _seeds(1)
    base = generate(small, ["a red cube"], s)
    res = generate(small, ["a red cube"], s, policy=HalfTokensSkipLayer(), kv_policy=kv_policy, record_entropy=True)
    assert len(res.bits) == 6 and res.trace.to_frame()["exited"].tolist() == [False] * 6 + [True]
    assert all(torch.equal(a, b) for a, b in zip(base.bits[:3], res.bits[:3]))
    layers = res.trace.layers_frame()
    assert layers.query("scale >= 3 and layer == 0")["kept"].eq(0).all()
    assert (
        layers.query("scale >= 3 and layer == 1")["kept"] == layers.query("scale >= 3 and layer == 1")["tokens"] // 2
    ).all()
    ran = layers[layers["kept"] > 0]
    assert ran["entropy_mean"].notna().all()
    assert (ran.query("scale == 0")["entropy_mean"] == 0).all()  # one key: a certain softmax
    assert (ran.query("scale > 0")["entropy_mean"] > 0).all()
    assert res.images.shape == base.images.shape


def test_user_errors(small) -> None:
    with pytest.raises(UserError, match="one seed per prompt"):
        generate(small, ["a", "b"], [1])
    with pytest.raises(UserError, match="guidance_scale lists 2 values"):
        generate(small, ["a"], [1], guidance_scale=[3.0, 3.0])
    with pytest.raises(UserError, match="temperature lists 1 values"):
        generate(small, ["a"], [1], temperature=[1.0])
    with pytest.raises(UserError, match="kv_policy"):
        generate(small, ["a"], [1], kv_policy="some")
    with pytest.raises(UserError, match="no aspect-ratio template"):
        generate(small, ["a"], [1], h_div_w=7.0)
    with pytest.raises(UserError, match="pixel budget"):
        generate(small, ["a"], [1], pixels="2M")


def test_long_prompt_is_truncated_with_a_warning(small) -> None:
    words = " ".join(f"w{i}" for i in range(small.transformer.config.text_maxlen + 5))
    with pytest.warns(UserWarning, match="truncated"):
        res = generate(small, [words], [3])
    assert res.images.shape[0] == 1


class EveryOtherToken(Pruner):
    def keep_tokens(self, si: int, li: int, x: torch.Tensor) -> torch.Tensor | None:
        return torch.arange(0, x.shape[1], 2).expand(x.shape[0], -1) if si >= 2 else None


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_bf16_blocks_under_autocast(monkeypatch: pytest.MonkeyPatch, kv_policy: str) -> None:
    """The CUDA recipe (bf16 blocks, bf16 autocast, bf16 KV cache) exercised with CPU autocast."""
    import toprovar.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_autocast", lambda device, dtype, **kw: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16 = build_backbone("test-small", device="cpu", dtype=torch.bfloat16)
    assert bf16.transformer.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert bf16.transformer.head.weight.dtype == torch.float32
    s = _seeds(2)
    res = generate(bf16, ["a red cube", "a dog"], s, policy=EveryOtherToken(), kv_policy=kv_policy, record_entropy=True)
    ref = generate(build_backbone("test-small", device="cpu"), ["a red cube", "a dog"], s)
    agree = torch.cat([(a == b).flatten() for a, b in zip(res.bits[:2], ref.bits[:2])]).float().mean()
    assert res.images.shape == ref.images.shape and agree > 0.9  # unpruned scales: bf16 ~ fp32

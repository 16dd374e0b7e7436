"""Fused block stages: the Triton kernels (interpreter on CPU) against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from tests.commands import run_interpreter_check

INTERPRETER_ON_GPU = (
    "the Triton interpreter is the CPU stand-in for the GPU; with a GPU the compiled kernels are "
    "tested instead (and triton 3.6's interpreter cannot take runtime loop bounds with new NumPy)"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason=INTERPRETER_ON_GPU)
def test_fused_kernels_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    run = run_interpreter_check("_fused_interpreter_check.py")
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_on_cuda() -> None:
    from toprovar.kernels.fused_block import LN_MODULATE, add_ln, qk_norm_rope

    B, n, H, D = 2, 37, 16, 128
    C = H * D
    x, y = torch.randn(B, n, C, device="cuda"), torch.randn(B, n, C, device="cuda", dtype=torch.bfloat16)
    ada = torch.randn(B, 1, 6, C, device="cuda")
    for use in (True, False):
        out = add_ln(
            x,
            y,
            ada[:, :, 0],
            ln=LN_MODULATE,
            scale=ada[:, :, 1],
            shift=ada[:, :, 2],
            out_dtype=torch.bfloat16,
            use_triton=use,
        )
        if use:
            fused = out
    torch.testing.assert_close(fused[0], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].float(), out[1].float(), rtol=2e-2, atol=2e-2)
    qkv = torch.randn(B, n, 3 * C, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(n, D // 2, device="cuda") * 6
    hs = torch.rand(1, H, 1, 1, device="cuda") + 1
    caches = [torch.zeros(2, B, H, n + 3, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    qs = [
        qk_norm_rope(qkv, H, hs, ang.cos(), ang.sin(), c[0][:, :, 3:], c[1][:, :, 3:], use_triton=u)
        for c, u in zip(caches, (True, False))
    ]
    torch.testing.assert_close(qs[0].float(), qs[1].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(caches[0].float(), caches[1].float(), rtol=2e-2, atol=2e-2)


def _fa_ok(out, ref, truth, atol: float) -> bool:
    """flash-attention's rule: max |kernel - truth| <= 2 max |same-dtype reference - truth| + atol."""
    return (out.double() - truth).abs().max().item() <= 2 * (ref.double() - truth).abs().max().item() + atol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_fused_rows_through_an_index_on_cuda(xdt: torch.dtype) -> None:
    """The gather (first stage), scatter (last stage) and RoPE rows of a pruned block through the
    kept-token index, at Infinity-2B's width: flash-attention's tolerance rule against float64."""
    from toprovar.kernels.fused_block import LN_MODULATE, add_ln, add_ln_reference, qk_norm_rope

    B, N, K, H, D = 2, 300, 111, 16, 128
    C = H * D
    idx = torch.stack([torch.sort(torch.randperm(N, device="cuda")[:K]).values for _ in range(B)])
    x = torch.randn(B, N, C, device="cuda").to(xdt)
    ada = torch.randn(B, 1, 6, C, device="cuda")
    mod = dict(ln=LN_MODULATE, scale=ada[:, :, 1] * 0.1, shift=ada[:, :, 2])
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in mod.items()}
    rest = dict(weight=None, bias=None)
    xa, ha = add_ln(x, src_index=idx, out_dtype=torch.bfloat16, **mod)
    xb, hb = add_ln(x, src_index=idx, out_dtype=torch.bfloat16, use_triton=False, **mod)
    xt, ht = add_ln_reference(
        x.double(), None, None, round_yg=False, eps=1e-6, out_dtype=torch.float64, src_index=idx, **rest, **f64
    )
    assert torch.equal(xa, xb) and _fa_ok(ha, hb, ht, 1e-5)
    y = torch.randn(B, K, C, device="cuda", dtype=torch.bfloat16)
    dst = [torch.randn(B, N, C, device="cuda") for _ in range(2)]
    dst[1].copy_(dst[0])
    truth = dst[0].double()
    ra, _ = add_ln(xa.float(), y, ada[:, :, 0], dst=dst[0], dst_index=idx)
    rb, _ = add_ln(xa.float(), y, ada[:, :, 0], dst=dst[1], dst_index=idx, use_triton=False)
    rt, _ = add_ln_reference(
        xa.double(),
        y.double(),
        ada[:, :, 0].double(),
        round_yg=False,
        ln=0,
        scale=None,
        shift=None,
        eps=1e-6,
        out_dtype=torch.float64,
        dst=truth,
        dst_index=idx,
        **rest,
    )
    assert ra is dst[0] and _fa_ok(ra, rb, rt, 1e-6)
    qkv = torch.randn(B, K, 3 * C, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(N, D // 2, device="cuda") * 6
    hs = torch.rand(1, H, 1, 1, device="cuda") + 1
    caches = [
        torch.zeros(2, B, H, K, D, device="cuda", dtype=dt) for dt in (torch.bfloat16, torch.bfloat16, torch.float64)
    ]
    cos = (ang.cos(), ang.cos(), ang.double().cos())
    sin = (ang.sin(), ang.sin(), ang.double().sin())
    qs = [
        qk_norm_rope(q_in, H, hs_in, c_, s_, c[0], c[1], rope_index=idx, use_triton=u)
        for q_in, hs_in, c_, s_, c, u in zip(
            (qkv, qkv, qkv.double()), (hs, hs, hs.double()), cos, sin, caches, (True, False, False)
        )
    ]
    assert _fa_ok(qs[0], qs[1], qs[2], 1e-5)
    assert _fa_ok(caches[0][0], caches[1][0], caches[2][0], 1e-5) and torch.equal(caches[0][1], caches[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [2, 37, 64])
def test_ln_linear_on_cuda(rows: int) -> None:
    """The few-rows linear with LayerNorm / GELU / residual fused, at Infinity-2B's widths (QKV,
    output projection with its residual, fc1 with GELU): flash-attention's rule against float64."""
    from toprovar.kernels.fused_block import LN_MODULATE
    from toprovar.kernels.fused_linear import ln_linear, ln_linear_reference

    C, F = 2048, 8192
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(2, rows // 2 or 1, C, device="cuda", generator=gen)
    ada = torch.randn(2, 1, 6, F, device="cuda", generator=gen) * 0.3
    mod = dict(ln=LN_MODULATE, scale=ada[:, :, 1, :C], shift=ada[:, :, 2, :C])
    for n_out, kw in ((3 * C, dict(mod)), (F, dict(mod, gelu=True))):
        w = (torch.randn(n_out, C, device="cuda", generator=gen) / C**0.5).bfloat16()
        b = (torch.randn(n_out, device="cuda", generator=gen) * 0.1).bfloat16()
        out, ref = ln_linear(x, w, b, **kw), ln_linear(x, w, b, use_triton=False, **kw)
        truth = ln_linear_reference(
            x.double(),
            w.double(),
            b.double(),
            **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
        )
        assert out.dtype == ref.dtype and _fa_ok(out, ref, truth, 1e-3)
    h = torch.randn(2, rows // 2 or 1, C, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(C, C, device="cuda", generator=gen) / C**0.5).bfloat16()
    b = (torch.randn(C, device="cuda", generator=gen) * 0.1).bfloat16()
    for res in (x, x.bfloat16()):
        kw = dict(residual=res, gamma=ada[:, :, 0, :C], round_yg=True)
        out, ref = ln_linear(h, w, b, **kw), ln_linear(h, w, b, use_triton=False, **kw)
        truth = ln_linear_reference(
            h.double(), w.double(), b.double(), residual=res.double(), gamma=ada[:, :, 0, :C].double()
        )
        assert out.dtype == ref.dtype == res.dtype and _fa_ok(out, ref, truth, 1e-3)


def _one_bf16_block_on_cuda(schedule: list[tuple[int, int, int]]):
    """A one-block model of width 256 (2 heads, text width 64) with random weights (seed 3) on CUDA,
    its blocks in bf16 as on the GPU recipe, and its RoPE table over `schedule`: (model, rope)."""
    from toprovar.models.transformer import InfinityTransformer, TransformerConfig, random_state_dict

    cfg = TransformerConfig(
        depth=1,
        embed_dim=256,
        num_heads=2,
        codebook_dim=8,
        text_channels=64,
        text_maxlen=8,
        pool_head_dim=32,
        block_chunks=1,
    )
    model = InfinityTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=3))
    model = model.cuda().eval()
    model.blocks.bfloat16()
    return model, model.rope_table(schedule, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_block_matches_forward_on_cuda() -> None:
    """A bf16 block on 2 rows of one token under autocast, the few-rows fused path vs the reference block."""
    from toprovar.fast import FastOptions
    from toprovar.fast.blocks import FastStep, run_fast_blocks
    from toprovar.models.transformer import RopeSlice

    model, rope = _one_bf16_block_on_cuda([(1, 1, 1), (1, 4, 4)])
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        cond = model.encode_condition(torch.randn(1, 6, 64, device="cuda"), [6], with_uncond=True)
        caches = [model.new_cache(2, 17, torch.bfloat16, "cuda") for _ in range(2)]
        block, x, rs = model.blocks[0], torch.randn(2, 1, 256, device="cuda"), RopeSlice(rope[0, :1], rope[1, :1])
        ref, _ = block(x, cond.gss, cond.text[0], rs, caches[0][0])
        step = FastStep(block, block.ada(cond.gss), cond.text[0], caches[1][0])
        out, _ = run_fast_blocks([step], x, rs, FastOptions(gelu_epilogue=False, small_m_rows=64))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("c, side", [(512, 64), (512, 256), (256, 512), (256, 1024), (128, 1024), (512, 512)])
def test_group_norm_launch_fits_the_grid(c: int, side: int) -> None:
    """The VAE decoder's GroupNorm shapes at 1024x1024 (2B: patch 16, 8B: patch 8) fit CUDA's grid
    limits (axis 0 < 2^31, axes 1-2 <= 65535); 256 channels at 1024x1024 once made 65536 blocks
    on axis 1 ("invalid argument")."""
    from toprovar.kernels.group_norm import launch_config

    cfg = launch_config(1, c, side * side)
    for grid in (cfg["stats_grid"], cfg["apply_grid"]):
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:])
    assert cfg["stats_grid"][0] * cfg["chunk"] >= side * side and cfg["chunk"] % cfg["block_p"] == 0
    assert cfg["apply_grid"][0] * cfg["block_p"] >= side * side and cfg["block_p"] * cfg["block_c"] <= 4096


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_norm_silu_on_cuda() -> None:
    from toprovar.kernels.group_norm import group_norm_silu

    x = (torch.randn(1, 128, 96, 80, device="cuda") * 2 + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = 1 + 0.1 * torch.randn(128, device="cuda"), 0.1 * torch.randn(128, device="cuda")
    y = group_norm_silu(x, 32, w.bfloat16(), b.bfloat16(), 1e-6)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, w, b, 1e-6))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gelu_epilogue", [False, True])
def test_forward_fast_matches_forward_on_cuda(gelu_epilogue: bool) -> None:
    """One bf16 block under autocast: fused stages (+ GELU epilogue) vs the reference block."""
    from toprovar.models.transformer import RopeSlice

    model, rope = _one_bf16_block_on_cuda([(1, 1, 1), (1, 4, 4), (1, 8, 8)])
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        cond = model.encode_condition(torch.randn(1, 6, 64, device="cuda"), [6], with_uncond=True)
        caches = [model.new_cache(2, 81, torch.bfloat16, "cuda") for _ in range(2)]
        block = model.blocks[0]
        x = torch.randn(2, 64, 256, device="cuda")
        rs = RopeSlice(rope[0, 17:81], rope[1, 17:81])
        prefix_k, prefix_v = torch.randn(2, 2, 17, 128, device="cuda"), torch.randn(2, 2, 17, 128, device="cuda")
        for c in caches:  # earlier scales' keys/values (torch.empty would leave garbage, even NaN)
            c[0].k[:, :, :17], c[0].v[:, :, :17] = prefix_k, prefix_v
            c[0].fill = 17
        ref, _ = block(x, cond.gss, cond.text[0], rs, caches[0][0])
        out, _ = block.forward_fast(x, block.ada(cond.gss), cond.text[0], rs, caches[1][0], gelu_epilogue=gelu_epilogue)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    k0, k1 = caches[0]._k[0, :, :, 17:81].float(), caches[1]._k[0, :, :, 17:81].float()
    assert ((k0 - k1).norm() / k0.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_planned_units_replay_the_eager_bits_on_cuda() -> None:
    """A fixed ToProVAR plan on the GPU: the first call runs its units eagerly, the second captures
    them, the third replays: all three draw the bits of the eager fused path (same kernels)."""
    from benchmarks.pruning import fixed_policy
    from toprovar.fast import FastOptions, release_fast_runtime
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate

    backbone = build_backbone("test-small", device="cuda")
    policy = fixed_policy(backbone.transformer.depth, min_scale=3, alpha=0.5, protect_layers=1)
    eager = generate(backbone, ["a red cube"], [7], policy=policy, fast=FastOptions(graphs=False))
    runs = [generate(backbone, ["a red cube"], [7], policy=policy, fast=True) for _ in range(3)]
    assert [r.runtime["units"]["captured"] > 0 for r in runs] == [False, True, False]
    assert runs[2].runtime["units"]["replayed"] > 0 and runs[2].runtime["units"]["eager"] == 0
    for r in runs:
        assert all(torch.equal(a, b) for a, b in zip(eager.bits, r.bits))
        assert r.trace.layers_frame()["kept"].tolist() == eager.trace.layers_frame()["kept"].tolist()
    release_fast_runtime(backbone)

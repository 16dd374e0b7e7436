"""BSQ VAE behaviour on the small `test` preset: quantizer maths, token layout, and a pin against
an independent functional re-implementation of the official formulas (fresh random weights)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from toprovar.models.vae import VAE_PRESETS, BitFlipNoise, build_vae

CFG = VAE_PRESETS["test"]
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 5, 5), (1, 8, 8)]  # VAE grid, 32x32 images
PATCHIFY_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]  # transformer grid -> 8x8 VAE


def _randomize(vae: torch.nn.Module) -> None:
    """Random weights everywhere, including GroupNorm affine (init leaves it at 1/0)."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))


@pytest.fixture
def vae():
    model = build_vae(CFG).eval()
    _randomize(model)
    return model


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


# ----------------------------------------------------------------------------- functional reference


def _res_block(sd, p, x, groups):
    h = x
    for i in (1, 2):
        h = F.group_norm(h, groups, sd[f"{p}norm{i}.norm.weight"], sd[f"{p}norm{i}.norm.bias"], eps=1e-6)
        h = h * torch.sigmoid(h)
        h = F.conv2d(h, sd[f"{p}conv{i}.conv.weight"], sd[f"{p}conv{i}.conv.bias"], padding=1)
    if f"{p}nin_shortcut.conv.weight" in sd:
        x = F.conv2d(x, sd[f"{p}nin_shortcut.conv.weight"], sd[f"{p}nin_shortcut.conv.bias"])
    return x + h


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], **kw)


def _ref_encode(sd, cfg, x):
    g = cfg.norm_groups
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for level in range(len(cfg.encoder_ch_mult)):
        for i in range(cfg.num_res_blocks):
            h = _res_block(sd, f"encoder.down.{level}.block.{i}.", h, g)
        if f"encoder.down.{level}.downsample.conv.conv.weight" in sd:
            h = _conv(sd, f"encoder.down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _res_block(sd, "encoder.mid.block_2.", _res_block(sd, "encoder.mid.block_1.", h, g), g)
    h = F.group_norm(h, g, sd["encoder.norm_out.norm.weight"], sd["encoder.norm_out.norm.bias"], eps=1e-6)
    return _conv(sd, "encoder.conv_out", h * torch.sigmoid(h), padding=1)


def _ref_decode(sd, cfg, z):
    g = cfg.norm_groups
    h = _conv(sd, "decoder.conv_in", z, padding=1)
    h = _res_block(sd, "decoder.mid.block_2.", _res_block(sd, "decoder.mid.block_1.", h, g), g)
    for level in reversed(range(len(cfg.decoder_ch_mult))):
        for i in range(cfg.num_res_blocks + 1):
            h = _res_block(sd, f"decoder.up.{level}.block.{i}.", h, g)
        if f"decoder.up.{level}.upsample.conv.conv.weight" in sd:
            h = _conv(
                sd, f"decoder.up.{level}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"), padding=1
            )
    h = F.group_norm(h, g, sd["decoder.norm_out.norm.weight"], sd["decoder.norm_out.norm.bias"], eps=1e-6)
    return _conv(sd, "decoder.conv_out", h * torch.sigmoid(h), padding=1).clamp(-1, 1)


def _ref_multiscale(z, schedule, d):
    """Official training loop (flip_requant without noise), written out plainly."""
    z = z.unsqueeze(2)
    full = schedule[-1]
    cum, bits_all, inputs = 0, [], []
    for si, size in enumerate(schedule):
        r = z - cum
        if si != len(schedule) - 1:
            r = F.interpolate(r, size=size, mode="area")
        x = F.normalize(r.permute(0, 2, 3, 4, 1), dim=-1)
        q = x + (torch.where(x > 0, 1.0, -1.0) / math.sqrt(d) - x)
        bits_all.append((q > 0).int())
        cum = cum + F.interpolate(q.permute(0, 4, 1, 2, 3), size=full, mode="trilinear")
        if si != len(schedule) - 1:
            inputs.append(F.interpolate(cum, size=schedule[si + 1], mode="trilinear"))
    return bits_all, inputs, cum


def test_matches_functional_reference(vae):
    sd = vae.state_dict()
    img = _images()
    with torch.no_grad():
        z = vae.encode(img)
        torch.testing.assert_close(z, _ref_encode(sd, CFG, img), rtol=1e-5, atol=1e-5)
        ms = vae.quantize_multiscale(z, SCHEDULE)
        bits, inputs, summed = _ref_multiscale(z, SCHEDULE, CFG.codebook_dim)
        for ours, ref in zip(ms.bits, bits, strict=True):
            assert torch.equal(ours, ref)
        for ours, ref in zip(ms.next_inputs, inputs, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ms.summed_codes, summed, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            vae.decode(ms.summed_codes), _ref_decode(sd, CFG, summed.squeeze(2)), rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------- quantizer maths


def test_bits_and_codes_are_binary_spherical(vae):
    d = CFG.codebook_dim
    z = torch.randn(3, d, 1, 4, 5)
    codes, bits = vae.quantizer.lfq.quantize(z)
    assert bits.shape == (3, 1, 4, 5, d) and bits.dtype == torch.int32
    assert set(bits.unique().tolist()) <= {0, 1}
    assert torch.equal(bits.bool(), z.movedim(1, -1) > 0)
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, 1 / math.sqrt(d)))
    torch.testing.assert_close(vae.bits_to_codes(bits), codes)
    torch.testing.assert_close(vae.bits_to_codes(bits).norm(dim=1), torch.ones(3, 1, 4, 5))


def test_generation_loop_reproduces_teacher_forcing(vae):
    """Summing upsampled codes of the target bits, as the generation loop does, gives exactly the
    next-scale inputs and summed codes that training uses."""
    with torch.no_grad():
        ms = vae.quantize_multiscale(vae.encode(_images()), SCHEDULE)
        summed = 0
        for si, bits in enumerate(ms.bits):
            summed = summed + vae.upsample_codes(vae.bits_to_codes(bits), SCHEDULE[-1])
            if si + 1 < len(SCHEDULE):
                torch.testing.assert_close(vae.upsample_codes(summed, SCHEDULE[si + 1]), ms.next_inputs[si])
        torch.testing.assert_close(summed, ms.summed_codes)


def test_resize_modes_follow_config(vae):
    codes = torch.randn(2, CFG.codebook_dim, 1, 4, 4)
    torch.testing.assert_close(
        vae.downsample_codes(codes, (2, 2)), F.avg_pool3d(codes, (1, 2, 2))
    )  # area == average pooling here
    torch.testing.assert_close(
        vae.upsample_codes(codes, (1, 8, 8)), F.interpolate(codes, size=(1, 8, 8), mode="trilinear")
    )


def test_schedule_must_end_at_latent_size(vae):
    with pytest.raises(ValueError, match="latent size"):
        vae.quantize_multiscale(torch.randn(1, CFG.codebook_dim, 8, 8), [(1, 1, 1), (1, 4, 4)])


# ----------------------------------------------------------------------------- noise (bitwise self-correction)


def test_bit_flip_noise_is_seeded_and_corrects_later_scales(vae):
    z = vae.encode(_images()).detach()
    clean = vae.quantize_multiscale(z, SCHEDULE)
    noise = BitFlipNoise(layers=2, strength=0.5)
    runs = [
        vae.quantize_multiscale(z, SCHEDULE, noise=noise, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)
    ]
    for a, b in zip(runs[0].bits, runs[1].bits):
        assert torch.equal(a, b)  # same seed, same result
    # Targets stay unflipped (scale 0 is clean); requantized flips change what later scales must
    # correct, so their targets differ from the clean chain.
    for noisy in runs:
        assert torch.equal(noisy.bits[0], clean.bits[0])
    assert any(not torch.equal(r.bits[si], clean.bits[si]) for r in runs for si in range(1, len(SCHEDULE)))
    no_requant = vae.quantize_multiscale(
        z, SCHEDULE, noise=BitFlipNoise(2, 0.5, requant=False), generator=torch.Generator().manual_seed(7)
    )
    for a, b in zip(no_requant.bits, clean.bits):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- token space


@pytest.mark.parametrize("patchify", [False, True])
def test_token_layout_round_trips(patchify):
    cfg = dataclasses.replace(CFG, apply_spatial_patchify=patchify)
    vae = build_vae(cfg)
    f = 2 if patchify else 1
    h, w = 3, 4  # transformer grid
    bits = torch.randint(0, 2, (2, 1, h * f, w * f, cfg.codebook_dim), dtype=torch.int32)
    tokens = vae.bits_to_tokens(bits)
    assert tokens.shape == (2, h * w, cfg.token_dim)
    assert torch.equal(vae.tokens_to_bits(tokens, (h, w)), bits)
    # Codes and bits share one token layout.
    codes_tok = vae.codes_to_tokens(vae.bits_to_codes(bits))
    torch.testing.assert_close(codes_tok, (tokens.float() * 2 - 1) / math.sqrt(cfg.codebook_dim))
    assert vae.vae_schedule([(1, h, w)]) == [(1, h * f, w * f)]


def test_patchify_token_groups_2x2_cells():
    vae = build_vae(dataclasses.replace(CFG, apply_spatial_patchify=True))
    d = CFG.codebook_dim
    bits = torch.randint(0, 2, (1, 1, 4, 4, d), dtype=torch.int32)
    tokens = vae.bits_to_tokens(bits)  # (1, 4, 4d); channel = bit * 4 + (dy * 2 + dx)
    ty, tx, dy, dx = 1, 0, 1, 1
    token = tokens[0, ty * 2 + tx].reshape(d, 4)[:, dy * 2 + dx]
    assert torch.equal(token, bits[0, 0, 2 * ty + dy, 2 * tx + dx])


@pytest.mark.parametrize("patchify", [False, True])
def test_teacher_forcing_shapes(patchify):
    cfg = dataclasses.replace(CFG, apply_spatial_patchify=patchify)
    vae = build_vae(cfg).eval()
    schedule = PATCHIFY_SCHEDULE if patchify else SCHEDULE  # both end at the 8x8 latent
    with torch.no_grad():
        inputs, targets = vae.teacher_forcing(_images(2, 32), schedule)
    lengths = [h * w for _, h, w in schedule]
    assert inputs.shape == (2, sum(lengths[1:]), cfg.token_dim) and inputs.dtype == torch.float32
    assert [t.shape for t in targets] == [(2, n, cfg.token_dim) for n in lengths]
    assert all(t.dtype == torch.int64 for t in targets)


# ----------------------------------------------------------------------------- decode


def test_decode_is_clamped_image_and_accepts_4d_or_5d(vae):
    codes = torch.randn(2, CFG.codebook_dim, 1, 8, 8) * 3
    with torch.no_grad():
        img5, img4 = vae.decode(codes), vae.decode(codes.squeeze(2))
    assert img5.shape == (2, 3, 32, 32)
    assert torch.equal(img5, img4)
    assert img5.min() >= -1 and img5.max() <= 1


def test_decode_bf16_channels_last_close_to_fp32(vae):
    codes = vae.bits_to_codes(torch.randint(0, 2, (2, 1, 8, 8, CFG.codebook_dim)))
    with torch.no_grad():
        ref = vae.decode(codes)
        fast = vae.to(torch.bfloat16, memory_format=torch.channels_last).decode(codes)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=0.1, atol=0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        dataclasses.replace(CFG, patch_size=6)
    with pytest.raises(ValueError, match="too short"):
        dataclasses.replace(CFG, patch_size=16)
    with pytest.raises(ValueError, match="norm_groups"):
        dataclasses.replace(CFG, norm_groups=5)

"""Infinity's BSQ VAE: convolutional encoder, multi-scale bitwise quantizer, decoder.

Module and parameter names follow the official checkpoints one to one (`encoder.down.0.block.1.
conv1.conv.weight`, `quantizer.lfq.mask`, ...), so official `.pth` files load with no rename map.
The official model registers its quantizer twice (`quantizer` and the alias `quantize`), so its
checkpoints hold both `quantizer.lfq.mask` and `quantize.lfq.mask`; we keep the same alias.

Token space. The transformer sees each scale as a sequence of `token_dim` bits per token. With
spatial patchify (Infinity-8B) a token covers 2x2 VAE latent cells (`token_dim = 4 d`) and the
VAE grid of a scale is twice the transformer's; `bits_to_tokens`, `tokens_to_bits` and
`codes_to_tokens` convert exactly as the official trainer and inference loop do.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toprovar.errors import UserError
from toprovar.kernels.group_norm import group_norm_silu
from toprovar.models.bsq import BitFlipNoise, MultiScaleBSQ, MultiScaleCodes
from toprovar.models.checkpoint import load_into

__all__ = ["VAEConfig", "VAE_PRESETS", "BSQVAE", "BitFlipNoise", "MultiScaleCodes", "load_vae", "build_vae"]


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a BSQ VAE. `z_channels` equals `codebook_dim` (no projection)."""

    codebook_dim: int = 32
    patch_size: int = 16  # image pixels per latent cell along each side
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    norm_groups: int = 32
    apply_spatial_patchify: bool = False  # transformer tokens cover 2x2 latent cells
    interpolate_up: str = "trilinear"
    interpolate_down: str = "area"

    def __post_init__(self) -> None:
        # Tuples whatever the caller passed (lists from YAML), so configs stay hashable.
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        levels = math.log2(self.patch_size)
        if self.patch_size < 1 or not levels.is_integer():
            raise ValueError(f"VAE patch_size must be a power of two, got {self.patch_size}")
        # The official encoder downsamples at levels < log2(patch), the decoder upsamples at
        # 1 <= level <= log2(patch): both need enough levels to reach the patch size.
        if len(self.encoder_ch_mult) < levels or len(self.decoder_ch_mult) < levels + 1:
            raise ValueError(
                f"VAE ch_mult too short for patch_size {self.patch_size}: encoder needs "
                f">= {int(levels)} levels, decoder >= {int(levels) + 1}"
            )
        for mult in {*self.encoder_ch_mult, *self.decoder_ch_mult}:
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(f"VAE channels {self.ch * mult} not divisible by norm_groups {self.norm_groups}")

    @property
    def z_channels(self) -> int:
        return self.codebook_dim

    @property
    def token_dim(self) -> int:
        """Bits per transformer token."""
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    # Infinity-2B: infinity_vae_d32reg.pth
    "d32": VAEConfig(codebook_dim=32, patch_size=16, encoder_ch_mult=(1, 2, 4, 4, 4), decoder_ch_mult=(1, 2, 4, 4, 4)),
    # Infinity-8B: infinity_vae_d56_f8_14_patchify.pth
    "d14_patchify": VAEConfig(
        codebook_dim=14,
        patch_size=8,
        encoder_ch_mult=(1, 2, 4, 4),
        decoder_ch_mult=(1, 2, 4, 4),
        apply_spatial_patchify=True,
    ),
    # About 0.2M parameters: fast CPU tests (32x32 images -> 8x8 latents).
    "test": VAEConfig(
        codebook_dim=6,
        patch_size=4,
        ch=16,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        num_res_blocks=1,
        norm_groups=8,
    ),
}


def get_vae_config(name_or_config: str | VAEConfig) -> VAEConfig:
    if isinstance(name_or_config, VAEConfig):
        return name_or_config
    if name_or_config not in VAE_PRESETS:
        raise UserError(f"unknown VAE preset '{name_or_config}'; choose one of {', '.join(VAE_PRESETS)}")
    return VAE_PRESETS[name_or_config]


# ----------------------------------------------------------------------------- building blocks
# `Conv` and `Normalize` wrap the torch layer in a `.conv` / `.norm` child only to match the
# official parameter names.


class Conv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


# Set by `BSQVAE.decode(fused_norm=True)`: GroupNorm + SiLU through toprovar.kernels.group_norm (Triton for
# channels-last CUDA activations; the same eager ops otherwise).
_FUSED_NORM: contextvars.ContextVar[bool] = contextvars.ContextVar("toprovar_vae_fused_norm", default=False)


def _norm_silu(norm: Normalize, x: Tensor, silu: bool = True) -> Tensor:
    if _FUSED_NORM.get() and x.is_cuda:
        gn = norm.norm
        return group_norm_silu(x, gn.num_groups, gn.weight, gn.bias, gn.eps, silu=silu)
    h = norm(x)
    return F.silu(h) if silu else h


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the official asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Middle(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, mults = cfg.norm_groups, cfg.encoder_ch_mult
        n_down = int(math.log2(cfg.patch_size))
        self.conv_in = Conv(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(mults):
            block_in = cfg.ch * ((1,) + mults)[level]
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            stage = _Level(blocks)
            if level < n_down:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Middle(block_in, g)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = Conv(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, mults = cfg.norm_groups, cfg.decoder_ch_mult
        n_up = int(math.log2(cfg.patch_size))
        block_in = cfg.ch * mults[-1]
        self.conv_in = Conv(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, g)
        levels: list[_Level] = []
        for level in reversed(range(len(mults))):
            block_out = cfg.ch * mults[level]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            stage = _Level(blocks)
            if 1 <= level <= n_up:
                stage.upsample = Upsample(block_in)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)  # indexed by level: up[0] is the finest, runs last
        self.norm_out = Normalize(block_in, g)
        self.conv_out = Conv(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


# ----------------------------------------------------------------------------- the VAE


class BSQVAE(nn.Module):
    """Encoder + multi-scale BSQ + decoder. Images are `(B, 3, H, W)` in [-1, 1]."""

    def __init__(self, config: VAEConfig | str):
        super().__init__()
        self.config = get_vae_config(config)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantizer = MultiScaleBSQ(
            self.config.codebook_dim, self.config.interpolate_up, self.config.interpolate_down
        )
        self.quantize = self.quantizer  # official alias; checkpoints store both names

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    # -- pixels <-> latents

    def encode(self, img: Tensor) -> Tensor:
        """`(B, 3, H, W)` image in [-1, 1] -> continuous latent `(B, d, H/p, W/p)` float32."""
        p = self.config.patch_size
        if img.ndim != 4 or img.shape[-2] % p or img.shape[-1] % p:
            raise ValueError(f"encode expects (B, 3, H, W) with H, W multiples of {p}, got {tuple(img.shape)}")
        return self.encoder(img.to(self._dtype)).float()

    def decode(
        self, codes: Tensor, *, channels_last: bool = False, fused_norm: bool = False, cudnn_benchmark: bool = False
    ) -> Tensor:
        """Summed codes `(B, d, H, W)` (or `(B, d, 1, H, W)`) -> image `(B, 3, pH, pW)` in [-1, 1].

        Runs in the decoder's dtype. CUDA speed switches (same function, other rounding order):
        `channels_last` runs the convolutions on NHWC activations; `fused_norm` runs each
        GroupNorm + SiLU as the split-statistics Triton kernels of `toprovar.kernels.group_norm` (NHWC);
        `cudnn_benchmark` lets cuDNN time its convolution algorithms (first call per shape slow).
        """
        if codes.ndim == 5:
            codes = codes.squeeze(2)
        z = codes.to(self._dtype)
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        token = _FUSED_NORM.set(fused_norm)
        cudnn = torch.backends.cudnn
        flags = (
            cudnn.flags(
                enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
            )
            if cudnn_benchmark
            else contextlib.nullcontext()
        )
        try:
            with flags:
                return self.decoder(z).clamp(-1.0, 1.0)
        finally:
            _FUSED_NORM.reset(token)

    # -- multi-scale codes (VAE grid)

    def quantize_multiscale(
        self,
        z: Tensor,
        vae_scale_schedule: Sequence[Sequence[int]],
        *,
        noise: BitFlipNoise | None = None,
        generator: torch.Generator | None = None,
    ) -> MultiScaleCodes:
        """Bits per scale, next-scale inputs and summed codes, as the official trainer builds them."""
        return self.quantizer(z, vae_scale_schedule, noise=noise, generator=generator)

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """`(B, 1, h, w, d)` bits -> `(B, d, 1, h, w)` float32 codes of norm 1 (±1/sqrt(d))."""
        return self.quantizer.lfq.bits_to_codes(bits)

    def upsample_codes(self, codes: Tensor, size: Sequence[int]) -> Tensor:
        """Resize `(B, d, 1, h, w)` codes to `size` ((t, h, w) or (h, w)), official 'up' mode."""
        return self.quantizer.upsample(codes, size)

    def downsample_codes(self, codes: Tensor, size: Sequence[int]) -> Tensor:
        """Resize `(B, d, 1, h, w)` codes to `size` ((t, h, w) or (h, w)), official 'down' mode."""
        return self.quantizer.downsample(codes, size)

    # -- transformer token space

    def vae_schedule(self, scale_schedule: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
        """Transformer scale schedule [(t, h, w)] -> the VAE grid per scale (2x with patchify)."""
        f = 2 if self.config.apply_spatial_patchify else 1
        return [(int(t), int(h) * f, int(w) * f) for t, h, w in scale_schedule]

    def bits_to_tokens(self, bits: Tensor) -> Tensor:
        """`(B, 1, h, w, d)` bits -> `(B, L, token_dim)` in the transformer's token order."""
        b = bits.shape[0]
        if not self.config.apply_spatial_patchify:
            return bits.reshape(b, -1, self.codebook_dim)
        grid = F.pixel_unshuffle(bits.squeeze(1).permute(0, 3, 1, 2), 2)  # (B, 4d, h/2, w/2)
        return grid.permute(0, 2, 3, 1).reshape(b, -1, self.token_dim)

    def tokens_to_bits(self, tokens: Tensor, hw: Sequence[int]) -> Tensor:
        """`(B, h*w, token_dim)` bits on the transformer grid `hw` -> `(B, 1, H, W, d)` VAE grid."""
        h, w = int(hw[-2]), int(hw[-1])
        grid = tokens.reshape(tokens.shape[0], h, w, -1)
        if self.config.apply_spatial_patchify:
            grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return grid.unsqueeze(1)

    def codes_to_tokens(self, codes: Tensor) -> Tensor:
        """`(B, d, 1, h, w)` or `(B, d, h, w)` codes -> `(B, L, token_dim)` transformer input."""
        if codes.ndim == 5:
            codes = codes.squeeze(2)
        if self.config.apply_spatial_patchify:
            codes = F.pixel_unshuffle(codes, 2)
        return codes.flatten(2).transpose(1, 2)

    def teacher_forcing(
        self,
        img: Tensor,
        scale_schedule: Sequence[Sequence[int]],
        *,
        noise: BitFlipNoise | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Training pair for the transformer from images, as the official trainer builds it.

        Returns (`x_BLC_wo_prefix` `(B, sum_{s>=1} L_s, token_dim)` float32 next-scale inputs,
        per-scale bit targets `(B, L_s, token_dim)` int64); `scale_schedule` is the transformer's.
        """
        ms = self.quantize_multiscale(
            self.encode(img), self.vae_schedule(scale_schedule), noise=noise, generator=generator
        )
        inputs = torch.cat([self.codes_to_tokens(x) for x in ms.next_inputs], dim=1)
        targets = [self.bits_to_tokens(b).long() for b in ms.bits]
        return inputs, targets

    @property
    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.conv.weight.dtype


def build_vae(
    config: VAEConfig | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> BSQVAE:
    """Construct a VAE; `device="meta"` allocates nothing (for shape checks and later loading)."""
    with torch.device(device):
        vae = BSQVAE(config)
    return vae.to(dtype=dtype) if str(device) != "meta" else vae


def load_vae(
    path: str | Path, config: VAEConfig | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> BSQVAE:
    """Load an official (or our own) VAE checkpoint strictly; frozen and in eval mode.

    Every key must be present with the exact shape and nothing else may be left over; a mismatch
    is a one-line `UserError` naming the file and the key.
    """
    vae = build_vae(config, device="meta")
    load_into(vae, path)
    vae = vae.to(device=device, dtype=dtype).eval()
    vae.requires_grad_(False)
    return vae

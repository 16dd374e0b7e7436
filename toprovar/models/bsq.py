"""Binary spherical quantization (BSQ) over a schedule of scales, as Infinity uses it.

Shapes follow the official code: continuous latents and codes are `(B, d, t, h, w)` (t = 1 for
images), bit labels are `(B, t, h, w, d)` integers in {0, 1}. A code is a bit vector mapped to
{-1/sqrt(d), +1/sqrt(d)}^d, i.e. a point on the unit sphere.

The multi-scale residual loop mirrors the official *training* path
(`BitwiseSelfCorrection.flip_requant`), which defines the transformer's teacher-forcing inputs
and bit targets: at scale s the residual (latent minus the codes summed so far) is area-resized
to the scale, quantized, and the codes are trilinearly resized back to full size and accumulated.
The transformer's input for scale s+1 is the running sum trilinearly resized to scale s+1 — the
same thing the generation loop computes from sampled bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BitFlipNoise:
    """Bitwise self-correction (Infinity training): flip random bits on the first `layers` scales.

    Per noisy scale a flip rate is drawn uniformly from {0, 0.01, ..., strength}; each bit flips
    with that probability. With `requant` the flipped codes feed the residual chain, so later scales
    learn to correct earlier mistakes; the returned bit targets of a noisy scale stay unflipped.
    """

    layers: int
    strength: float
    requant: bool = True

    def __post_init__(self) -> None:
        if self.layers < 0 or not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"BitFlipNoise needs layers >= 0 and 0 <= strength <= 1, got {self}")


@dataclass
class MultiScaleCodes:
    """What one image's latent becomes under a scale schedule (all on the latent's device)."""

    bits: list[Tensor]
    """Per scale `(B, 1, h, w, d)` int32 bit targets (unflipped), VAE grid."""
    next_inputs: list[Tensor]
    """Per scale except the last: `(B, d, 1, h', w')` float, summed codes resized to scale s+1."""
    summed_codes: Tensor
    """`(B, d, 1, H, W)` float, the sum of all scales' codes at full latent size."""


class BSQ(nn.Module):
    """Single-scale binary spherical quantizer (the official `lfq` submodule).

    `mask` (powers of two, most significant first; the official code turns bits into integer labels
    with it) is kept as a persistent buffer only because official checkpoints store it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.codebook_scale = 1.0 / math.sqrt(dim)
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, d, t, h, w)` latent -> (codes `(B, d, t, h, w)`, bits `(B, t, h, w, d)` int32)."""
        x = F.normalize(z.float().movedim(1, -1), dim=-1)
        sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
        zhat = sign * (1.0 / self.dim**0.5)
        # Straight-through form, as official: identical forward arithmetic, gradients pass through.
        quantized = x + (zhat - x).detach()
        bits = (quantized > 0).to(torch.int32)
        return quantized.movedim(-1, 1), bits

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """`(B, t, h, w, d)` bits in {0, 1} -> `(B, d, t, h, w)` float32 codes of norm 1."""
        # Same arithmetic order as official `indices_to_codes(..., 'bit_label')` (bit-identical).
        codes = bits.float() * self.codebook_scale * 2 - self.codebook_scale
        return F.normalize(codes, dim=-1).movedim(-1, 1)


class MultiScaleBSQ(nn.Module):
    """Residual BSQ over a scale schedule (the official `quantizer` module, no projections)."""

    def __init__(self, dim: int, interpolate_up: str = "trilinear", interpolate_down: str = "area"):
        super().__init__()
        self.lfq = BSQ(dim)
        self.z_interplote_up = interpolate_up  # official attribute names (sic)
        self.z_interplote_down = interpolate_down

    def upsample(self, codes: Tensor, size: Sequence[int]) -> Tensor:
        """Resize `(B, d, t, h, w)` codes to `size` (t, h, w) with the official 'up' mode."""
        return _resize(codes, size, self.z_interplote_up)

    def downsample(self, codes: Tensor, size: Sequence[int]) -> Tensor:
        """Resize `(B, d, t, h, w)` codes to `size` (t, h, w) with the official 'down' mode."""
        return _resize(codes, size, self.z_interplote_down)

    def forward(
        self,
        z: Tensor,
        schedule: Sequence[Sequence[int]],
        noise: BitFlipNoise | None = None,
        generator: torch.Generator | None = None,
    ) -> MultiScaleCodes:
        """Quantize a `(B, d, H, W)` or `(B, d, 1, H, W)` latent over `schedule` [(t, h, w), ...].

        The last schedule entry must equal the latent size. `generator` drives `noise` only.
        """
        z = z.float()
        if z.ndim == 4:
            z = z.unsqueeze(2)
        schedule = [tuple(int(v) for v in s) for s in schedule]
        full = tuple(z.shape[2:])
        if not schedule or schedule[-1] != full:
            raise ValueError(f"scale schedule must end at the latent size {full}, got {schedule[-1:]}")
        summed = torch.zeros_like(z)
        bits_per_scale: list[Tensor] = []
        next_inputs: list[Tensor] = []
        last = len(schedule) - 1
        for si, size in enumerate(schedule):
            residual = z - summed
            if si != last:
                residual = self.downsample(residual, size)
            codes, bits = self.lfq.quantize(residual)
            bits_per_scale.append(bits)
            if noise is not None and si < noise.layers:
                flipped = _flip_bits(bits, noise.strength, generator)
                if noise.requant:
                    codes = self.lfq.bits_to_codes(flipped)
            summed = summed + self.upsample(codes, full)
            if si != last:
                next_inputs.append(self.upsample(summed, schedule[si + 1]))
        return MultiScaleCodes(bits=bits_per_scale, next_inputs=next_inputs, summed_codes=summed)


def _resize(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    if x.ndim != 5:
        raise ValueError(f"expected codes of shape (B, d, t, h, w), got {tuple(x.shape)}")
    size = tuple(int(v) for v in size)
    if len(size) == 2:
        size = (x.shape[2], *size)
    if tuple(x.shape[2:]) == size and mode in ("area", "nearest", "nearest-exact"):
        return x  # these modes are exact identities at equal size
    return F.interpolate(x, size=size, mode=mode).contiguous()


def _flip_bits(bits: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    # Rate stays a tensor: no host sync. `generator` must live on the bits' device.
    steps = int(round(100 * strength))
    rate = torch.randint(0, steps + 1, (), generator=generator, device=bits.device) * 0.01
    flip = torch.rand(bits.shape, generator=generator, device=bits.device) < rate
    return torch.where(flip, 1 - bits, bits)

"""Bitwise sampling with top-k / top-p and one seeded generator per image.

Infinity predicts 2 logits per bit (bit = 0, bit = 1). Official sampling (`sample_with_top_k_top_p_
also_inplace_modifying_logits_`) treats every bit as a 2-way categorical: top-k (a no-op for any
k >= 2), top-p (drop the less likely value when its probability is <= 1 - top_p), then
`torch.multinomial` with the generator (or, `sync_free`, the same draw without its host-side
validity checks: same ops, same generator, same bits). We draw each image's bits with its own
generator, in the same order the official loop does for a batch of one, so a seed gives the same
bits whether the image is generated alone or in a batch (given equal logits) and equals the
official sampler with `g_seed = seed` for a single image.

Before that, `GuidedSampling` turns a scale's logits into the conditional rows' logits as the
official loop does: divide by the scale's temperature, then classifier-free guidance on the logits
(`guidance_scale * conditional + (1 - guidance_scale) * unconditional`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from toprovar.errors import UserError


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def filter_top_k_top_p_(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Mask (-inf, in place) values outside top-k / top-p along the last dim, as officially."""
    v = logits.shape[-1]
    if top_k > 0:
        k = min(top_k, v)
        kth = logits.topk(k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits.masked_fill_(drop_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, drop_sorted), -torch.inf)
    return logits


def bit_probs(logits: Tensor, *, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Bitwise logits `(B, n, 2 * d)` -> filtered probabilities `(B, n * d, 2)` (bit = 0, bit = 1).

    `logits` is modified in place (filtered).
    """
    b, n, two_d = logits.shape
    pairs = filter_top_k_top_p_(logits.reshape(b, n * two_d // 2, 2), top_k=top_k, top_p=top_p)
    return pairs.softmax(dim=-1)


def draw_bits(probs: Tensor, generators: list[torch.Generator], n: int, *, sync_free: bool = False) -> Tensor:
    """Probabilities `(B, n * d, 2)` -> bits `(B, n, d)` int64, row b drawn with `generators[b]`.

    `torch.multinomial(p, 1, replacement=True)` reads two validity checks back to the host before
    drawing (`argmax(p / q)`, q ~ Exp(1) from the generator). `sync_free` runs that draw without
    the checks: the same ops on the same generator, so the same bits, and no host synchronization.
    """
    b = probs.shape[0]
    if len(generators) != b:
        raise ValueError(f"{b} rows of probabilities but {len(generators)} generators")
    if sync_free:
        bits = [
            torch.argmax(
                probs[i] / torch.empty_like(probs[i]).exponential_(1, generator=generators[i]), dim=-1, keepdim=True
            )
            for i in range(b)
        ]
    else:
        bits = [torch.multinomial(probs[i], num_samples=1, replacement=True, generator=generators[i]) for i in range(b)]
    return torch.stack(bits).view(b, n, -1)


def sample_bits(
    logits: Tensor, generators: list[torch.Generator], *, top_k: int = 0, top_p: float = 0.0, sync_free: bool = False
) -> Tensor:
    """Bitwise logits `(B, n, 2 * d)` -> sampled bits `(B, n, d)` int64 (values 0 or 1).

    Row b uses `generators[b]`. `logits` is modified in place (filtered). Runs on the logits'
    device; with `sync_free` also without host synchronization (`draw_bits`).
    """
    b, n, _ = logits.shape
    if len(generators) != b:
        raise ValueError(f"{b} rows of logits but {len(generators)} generators")
    return draw_bits(bit_probs(logits, top_k=top_k, top_p=top_p), generators, n, sync_free=sync_free)


def _per_scale(value: float | Sequence[float], n: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * n
    values = [float(v) for v in value]
    if len(values) < n:
        raise UserError(
            f"{name} lists {len(values)} values but the schedule has {n} scales; give one number or at least {n}"
        )
    return tuple(values[:n])


@dataclass(frozen=True)
class GuidedSampling:
    """Logits of a scale -> bit probabilities, in the official order: temperature, classifier-free
    guidance on the logits, top-k / top-p, softmax. Hashable: the fast path keys its graphs on it."""

    guidance_scale: tuple[float, ...]  # per scale; 1: the scale runs without guidance
    temperature: tuple[float, ...]  # per scale
    top_k: int
    top_p: float

    @classmethod
    def per_scale(
        cls,
        guidance_scale: float | Sequence[float],
        temperature: float | Sequence[float],
        n_scales: int,
        top_k: int,
        top_p: float,
    ) -> GuidedSampling:
        """One number for every scale or one per scale (extra values ignored); too few: UserError."""
        return cls(
            _per_scale(guidance_scale, n_scales, "guidance_scale"),
            _per_scale(temperature, n_scales, "temperature"),
            top_k,
            top_p,
        )

    @property
    def guided(self) -> bool:
        """Some scale needs the unconditional rows (the transformer batch is doubled)."""
        return any(g != 1 for g in self.guidance_scale)

    def logits(self, logits: Tensor, si: int, batch: int) -> Tensor:
        """Logits `(rows, n, 2 * d)` of scale si, rows `[:batch]` conditional and `[batch:]`
        unconditional when present -> the guided logits `(batch, n, 2 * d)`."""
        logits = logits.mul(1 / self.temperature[si])
        scale = self.guidance_scale[si]
        if logits.shape[0] != batch and scale != 1:
            return scale * logits[:batch] + (1 - scale) * logits[batch:]
        return logits[:batch]

    def at_scale(self, si: int) -> tuple[float, float, int, float]:
        """What scale si's sampling computes with (a captured graph bakes these constants in)."""
        return self.temperature[si], self.guidance_scale[si], self.top_k, self.top_p

    def probs(self, logits: Tensor, si: int, batch: int) -> Tensor:
        """Logits of scale si -> filtered probabilities `(batch, n * d, 2)` (`logits`, then `bit_probs`)."""
        return bit_probs(self.logits(logits, si, batch), top_k=self.top_k, top_p=self.top_p)

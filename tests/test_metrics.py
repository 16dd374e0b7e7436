"""toprovar.metrics: PSNR (per image, mean, pooled) and SSIM through torchmetrics, checked against
the definitions on fresh random images."""

from __future__ import annotations

import math
import random

import pytest
import torch

from toprovar.metrics import geneval_scorer, psnr, ssim


def _images(gen: torch.Generator, n: int) -> torch.Tensor:
    h, w = random.randrange(11, 40), random.randrange(11, 40)  # SSIM's window needs 11 pixels
    return torch.randint(0, 256, (n, h, w, 3), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("trial", range(4))
def test_psnr_follows_its_definition(trial: int) -> None:
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    refs = _images(gen, 4)
    images = refs.clone()
    noise = torch.randint(-40, 41, images[1:].shape, generator=gen)
    images[1:] = (images[1:].int() + noise).clamp(0, 255).to(torch.uint8)
    mse = ((images.double() - refs.double()) / 255).pow(2).flatten(1).mean(1)
    per_image = psnr(images, refs)
    assert per_image.shape == (4,) and math.isinf(per_image[0])  # identical image: +inf
    torch.testing.assert_close(per_image[1:].double(), 10 * torch.log10(1 / mse[1:]), rtol=0, atol=1e-3)
    assert float(psnr(images, refs, "pooled")) == pytest.approx(-10 * math.log10(mse.mean()), abs=1e-3)
    assert math.isinf(float(psnr(images, refs, "mean")))  # one identical image makes the mean infinite
    assert float(psnr(images[1:], refs[1:], "mean")) == pytest.approx(float(per_image[1:].mean()), abs=1e-5)
    assert math.isinf(float(psnr(refs, refs, "pooled")))


def test_psnr_and_ssim_refuse_other_inputs() -> None:
    images = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reduction"):
        psnr(images, images, "sum")
    with pytest.raises(ValueError, match="uint8 images"):
        psnr(images.float(), images)
    with pytest.raises(ValueError, match="uint8 images"):
        ssim(images[..., :1], images[..., :1])


def test_ssim_is_one_for_identical_images_and_lower_otherwise() -> None:
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    refs = _images(gen, 3)
    values = ssim(refs, refs)
    torch.testing.assert_close(values, torch.ones(3), rtol=0, atol=1e-5)
    other = torch.randint(0, 256, refs.shape, generator=gen, dtype=torch.uint8)  # independent noise
    assert (ssim(other, refs) < 0.5).all()
    assert float(ssim(other, refs, "mean")) == pytest.approx(float(ssim(other, refs).mean()))


def test_geneval_scorer_exists_only_for_tiny() -> None:
    assert geneval_scorer("infinity-2b") is None and geneval_scorer("test-small") is None
    assert callable(geneval_scorer("tiny"))

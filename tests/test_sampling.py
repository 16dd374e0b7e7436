"""Temperature and guidance on the logits, bitwise top-k/top-p sampling with one seeded generator per image."""

from __future__ import annotations

import pytest
import torch

from toprovar.errors import UserError
from toprovar.sampling import GuidedSampling, bit_probs, filter_top_k_top_p_, make_generators, sample_bits


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_top_p_drops_the_unlikely_value() -> None:
    logits = torch.randn(3, 50, 16) * 4
    pairs = logits.reshape(3, -1, 2)
    p_one = pairs.softmax(-1)[..., 1]
    bits = sample_bits(logits.clone(), make_generators([_seed()] * 3, "cpu"), top_p=0.97)
    flat = bits.reshape(3, -1)
    assert (flat[p_one <= 0.03] == 0).all() and (flat[p_one >= 0.97] == 1).all()


def test_top_k_two_or_more_is_a_no_op_for_bits() -> None:
    pairs = torch.randn(2, 30, 2)
    assert torch.equal(filter_top_k_top_p_(pairs.clone(), top_k=900), pairs)
    one = filter_top_k_top_p_(pairs.clone(), top_k=1)
    assert torch.equal(one.isinf().sum(-1), torch.ones(2, 30, dtype=torch.long))


def test_frequencies_follow_probabilities() -> None:
    p = torch.rand(8) * 0.8 + 0.1
    logits = torch.stack([torch.zeros(8), torch.log(p / (1 - p))], -1).reshape(1, 1, 16).repeat(1, 4000, 1)
    bits = sample_bits(logits, make_generators([_seed()], "cpu"))
    freq = bits.float().mean(dim=(0, 1))
    assert torch.allclose(freq, p, atol=0.04)


def test_rows_use_their_own_generator() -> None:
    logits = torch.randn(3, 40, 12)
    s = [_seed() for _ in range(3)]
    batch = sample_bits(logits.clone(), make_generators(s, "cpu"))
    single = sample_bits(logits[2:].clone(), make_generators(s[2:], "cpu"))
    assert torch.equal(batch[2:], single)
    assert torch.equal(batch, sample_bits(logits.clone(), make_generators(s, "cpu")))
    assert batch.dtype == torch.int64 and batch.shape == (3, 40, 6)


@pytest.mark.parametrize("batch", [1, 3])
def test_guided_logits_follow_the_official_formula(batch: int) -> None:
    guidance = [1.0, float(torch.empty(()).uniform_(1.5, 5.0)), 3.0]
    temperature = [float(t) for t in torch.empty(3).uniform_(0.3, 1.5)]
    sampling = GuidedSampling.per_scale(guidance, temperature, 3, top_k=900, top_p=0.97)
    assert sampling.guided and hash(sampling) == hash(GuidedSampling.per_scale(guidance, temperature, 3, 900, 0.97))
    logits = torch.randn(2 * batch, 20, 8) * 3
    cond, uncond = logits[:batch] / temperature[1], logits[batch:] / temperature[1]
    torch.testing.assert_close(sampling.logits(logits, 1, batch), guidance[1] * cond + (1 - guidance[1]) * uncond)
    assert torch.equal(sampling.logits(logits, 0, batch), logits[:batch].mul(1 / temperature[0]))  # scale 1: cond
    unguided = GuidedSampling.per_scale(1.0, temperature, 3, top_k=900, top_p=0.97)
    assert not unguided.guided  # every scale at 1: the batch is not doubled, rows are the conditional ones
    assert torch.equal(unguided.logits(logits[:batch], 2, batch), logits[:batch].mul(1 / temperature[2]))
    probs = sampling.probs(logits.clone(), 1, batch)
    assert torch.equal(probs, bit_probs(sampling.logits(logits, 1, batch), top_k=900, top_p=0.97))
    assert probs.shape == (batch, 20 * 4, 2)


def test_per_scale_values_need_one_per_scale() -> None:
    assert GuidedSampling.per_scale([2.0, 3.0, 4.0, 5.0], 0.5, 3, 0, 0.0).guidance_scale == (2.0, 3.0, 4.0)
    with pytest.raises(UserError, match="guidance_scale lists 2 values but the schedule has 3 scales"):
        GuidedSampling.per_scale([2.0, 3.0], 1.0, 3, 0, 0.0)
    with pytest.raises(UserError, match="temperature lists 1 values"):
        GuidedSampling.per_scale(3.0, [1.0], 3, 0, 0.0)

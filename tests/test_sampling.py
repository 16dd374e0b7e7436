"""Bitwise top-k/top-p sampling with one seeded generator per image."""
from __future__ import annotations

import torch

from toprovar.sampling import filter_top_k_top_p_, make_generators, sample_bits


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

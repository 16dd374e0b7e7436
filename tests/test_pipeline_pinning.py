"""Regression pin: logits and sampled bits of the small test backbones, fixed weights and seed.

The model and loop were checked against the official Infinity code (same random state dict, CPU
fp32: logits within 3.0e-6 relative at every scale, identical sampled bits; see docs/benchmarks.md).
These numbers were recorded right after that check; a change here means the numerics moved.
Weights: `random_state_dict(config, seed=0)`; text: the hashed test encoder; seed 7.
"""

from __future__ import annotations

import pytest
import torch

import toprovar.pipeline as pipeline
import toprovar.scale_paths as scale_paths
from toprovar.models.registry import build_backbone

PINNED = {
    "test-small": {
        "abs_mean": [0.10925, 0.122264, 0.141841, 0.1139, 0.138022, 0.135818, 0.151443],
        "last_token_first4": [
            [-0.055822, 0.103896, -0.180318, 0.003594],
            [-0.080494, 0.241032, -0.263863, -0.091592],
            [-0.09128, 0.135971, -0.211957, 0.027675],
            [-0.093891, 0.117315, -0.26433, 0.080574],
            [-0.181771, 0.044506, -0.195658, 0.169631],
            [-0.247423, 0.13536, -0.131663, 0.061087],
            [-0.392625, 0.058752, -0.179483, 0.076648],
        ],
        "bits_sum": [5, 13, 50, 104, 193, 449, 763],
    },
    "test-small-patchify": {
        "abs_mean": [0.149814, 0.136279, 0.135504, 0.138467, 0.121548, 0.135689, 0.132074],
        "last_token_first4": [
            [0.156184, 0.370666, -0.153578, 0.159596],
            [0.22973, -0.003825, 0.05712, 0.376126],
            [0.241862, -0.086035, 0.001457, 0.296729],
            [0.319182, -0.096717, -0.018058, 0.422683],
            [0.304991, -0.191403, 0.028774, 0.270485],
            [0.284056, -0.151157, 0.074003, 0.21734],
            [0.244187, -0.102834, 0.061525, 0.17246],
        ],
        "bits_sum": [15, 49, 187, 442, 762, 1738, 3103],
    },
}


def record_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Make the pipeline keep a copy of the logits of every scale it samples (the returned list)."""
    seen: list[torch.Tensor] = []
    sample = scale_paths.sample_bits

    def recording(logits, generators, top_k=0, top_p=0.0):
        seen.append(logits.clone())
        return sample(logits, generators, top_k=top_k, top_p=top_p)

    monkeypatch.setattr(scale_paths, "sample_bits", recording)  # the eager path samples there
    return seen


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_logits_and_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_logits(monkeypatch)
    result = pipeline.generate(build_backbone(name, device="cpu"), ["a red cube on the grass"], [7])
    pin = PINNED[name]
    abs_mean = torch.tensor([float(logits.abs().mean()) for logits in seen])
    first4 = torch.stack([logits[0, -1, :4] for logits in seen])
    torch.testing.assert_close(abs_mean, torch.tensor(pin["abs_mean"]), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(first4, torch.tensor(pin["last_token_first4"]), rtol=1e-4, atol=2e-6)
    assert [int(b.sum()) for b in result.bits] == pin["bits_sum"]

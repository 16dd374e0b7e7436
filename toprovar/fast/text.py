"""Text length buckets: the static buffers and CUDA graphs are keyed by the text length."""

from __future__ import annotations

import torch
from torch import Tensor

# Text padded to a multiple of this many tokens on the CUDA static path; T5 prompts of up to 32
# tokens (most captions) share one set of graphs.
TEXT_BUCKET = 32


def pad_text(features: Tensor, max_len: int, bucket: int = TEXT_BUCKET) -> Tensor:
    """Text features `(B, L, C)` zero-padded to a multiple of `bucket` tokens (at most `max_len`).

    Without this every batch whose longest prompt differs re-allocates the KV cache and
    re-captures every graph. The padded tokens are masked (the prompt lengths are unchanged), so
    they take no part in attention or pooling; only the rounding of the attention kernels may differ."""
    length = min(max_len, -(-features.shape[1] // bucket) * bucket)
    return torch.nn.functional.pad(features, (0, 0, 0, length - features.shape[1]))

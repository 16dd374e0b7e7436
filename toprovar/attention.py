"""The one attention entry point of the model.

`attention(q, k, v, *, entropy, scale)` is what every self-attention call goes through; the model
never knows which kernel ran. Tensors are `(B, H, L, D)`; the entropy is the natural-log Shannon
entropy of each query's softmax row, `(B, H, Lq)` float32. Without entropy, PyTorch SDPA runs
(flash / cuDNN / efficient on CUDA). With entropy, the kernel `entropy_kernel()` names:
  * "beside" (default): SDPA's own output, bit for bit the same as without entropy (the backend
    SDPA picks, asked for its log-sum-exp), and the entropy from one more pass over q·kᵀ reading
    that log-sum-exp (`toprovar.kernels.sdpa_entropy`: a Triton entropy-only kernel on CUDA, a
    chunked PyTorch pass elsewhere). So a scale whose probe layers read entropy and prune nothing
    draws the unpruned scale's bits (issue 24), on CPU and GPU alike.
  * "fae": the Flash Attention Entropy kernel, out and entropy in one pass
    (`toprovar.kernels.flash_attn_entropy`: Triton on CUDA, the chunked reference elsewhere);
    its out rounds differently from SDPA's. Kept to time against "beside" on the GPU.

`cross_attention` serves the text cross-attention (short, padded text keys with a padding mask).
`prefer_cudnn_attention()` makes SDPA try cuDNN first inside its block (the fastest SDPA kernel on
an H100 at Infinity's shapes, see ../shared/reference/anchors.md); SDPA still falls back to flash /
efficient / math for inputs cuDNN does not take.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.errors import UserError
from toprovar.kernels import flash_attn_entropy, sdpa_entropy

ENTROPY_KERNELS = {"beside": sdpa_entropy, "fae": flash_attn_entropy}
_entropy_kernel = ["beside"]  # the one in use (`entropy_kernel()` switches it)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, entropy: bool, scale: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention of every query over every key (no mask): `(out, entropy_or_None)`."""
    if entropy:
        return ENTROPY_KERNELS[_entropy_kernel[0]](q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


@contextlib.contextmanager
def entropy_kernel(name: str) -> Iterator[None]:
    """Within the block, `attention(..., entropy=True)` runs the kernel `name` ("beside", "fae")."""
    if name not in ENTROPY_KERNELS:
        raise UserError(f"entropy kernel {name!r}; choose one of {', '.join(ENTROPY_KERNELS)}")
    previous, _entropy_kernel[0] = _entropy_kernel[0], name
    try:
        yield
    finally:
        _entropy_kernel[0] = previous


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float | None = None
) -> Tensor:
    """Queries `(B, H, Lq, D)` over text keys `(B, H, Lt, D)`; mask `(B, Lt)` True = real token."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@contextlib.contextmanager
def prefer_cudnn_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, SDPA on CUDA tries cuDNN, then flash, efficient and math attention."""
    if not enabled or not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order, cuDNN only where it is chosen anyway
        ctx = sdpa_kernel(order)
    with ctx:
        yield

"""`FastOptions`: the switches of the fast path, and `resolve_fast` (what `generate(fast=...)` means)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toprovar.errors import UserError


@dataclass(frozen=True)
class FastOptions:
    """Switches of the fast path; `fast=True` takes all of them, ablations turn some off."""

    fused: bool = True  # fused AdaLN / LayerNorm / residual and q,k norm + RoPE + cache write
    graphs: bool = True  # static buffers: whole scales as CUDA graphs, pruned scales as planned units
    cudnn_attention: bool = True  # SDPA tries cuDNN attention first (CUDA)
    sync_free_sampling: bool = True  # draw bits without torch.multinomial's host-side checks
    gelu_epilogue: bool = True  # FFN GELU inside the first FFN matmul (cuBLASLt epilogue, CUDA)
    # VAE decode (CUDA): NHWC activations with split-statistics GroupNorm + SiLU kernels
    # (toprovar.kernels.group_norm). At batch 1 PyTorch's GroupNorm runs one thread block per group: the
    # 1024x1024 decode took 100 ms, 32 ms with these two switches (H100, docs/benchmarks.md). NHWC
    # alone, with PyTorch's GroupNorm, is slower than NCHW (131 ms): the switches go together.
    vae_channels_last: bool = True  # VAE decode on NHWC activations
    vae_fused_norm: bool = True  # VAE GroupNorm + SiLU as split-statistics Triton kernels (NHWC only)
    vae_cudnn_benchmark: bool = False  # let cuDNN time the VAE's convolution algorithms
    # Images the VAE decodes at once (CUDA; 0: the whole batch). The decoder's activations at
    # 1024² dominate a calibration's peak (issue 22: out of memory at batch 8 on 80 GB), and
    # they grow with the images decoded together, so chunks bound the peak.
    vae_decode_images: int = 4
    # CUDA: the static buffers (KV cache, condition) and the graphs of every key (batch size, text
    # length) come from one memory pool kept by the backbone's `FastRuntime`, so a new batch size
    # reuses the blocks the previous one freed (issue 22). Off: a pool per key (the old behaviour).
    shared_pool: bool = True
    # Fewer kernels per block (issue 16; off until measured on the GPU: benchmarks.pruning and
    # benchmarks.latency time them against the defaults, tools/block_kernels.py counts them):
    index_io: bool = False  # a pruned block's gather, scatter and RoPE rows inside its fused kernels
    chain_blocks: bool = False  # a block's last stage makes the next one's LayerNorm; equal keeps stay gathered
    host_plan: bool = False  # pruners whose policy fixes the keep counts plan without reading the device
    # Scales of at most this many rows (batch rows x tokens) run each matrix product with its
    # LayerNorm before and residual add after fused in (toprovar.kernels.fused_linear): 9 launches a block.
    small_m_rows: int = 0


def resolve_fast(fast: bool | FastOptions | None, device: torch.device) -> FastOptions | None:
    """None -> on for CUDA, off elsewhere; True -> every switch; False -> the plain loop."""
    if fast is None:
        fast = device.type == "cuda"
    if isinstance(fast, FastOptions):
        return fast
    if fast is True:
        return FastOptions()
    if fast is False:
        return None
    raise UserError(f"fast={fast!r}; give True, False, None (auto: on for CUDA) or a FastOptions")

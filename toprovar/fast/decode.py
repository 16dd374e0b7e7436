"""The VAE decode of the fast CUDA path: NHWC with fused GroupNorm + SiLU, in chunks of images."""

from __future__ import annotations

import torch
from torch import Tensor

from toprovar.fast.options import FastOptions
from toprovar.models.vae import BSQVAE


def decode(vae: BSQVAE, summed: Tensor, opts: FastOptions) -> Tensor:
    """Images of the summed codes, `opts.vae_decode_images` at a time (0: all): the decoder's
    activations at 1024² set a calibration's peak memory, and they grow with the images decoded
    together (issue 22), while a chunk of a few images keeps the GPU busy."""
    step = opts.vae_decode_images if opts.vae_decode_images > 0 else summed.shape[0]
    kw = {
        "channels_last": opts.vae_channels_last,
        "fused_norm": opts.vae_fused_norm,
        "cudnn_benchmark": opts.vae_cudnn_benchmark,
    }
    return torch.cat([vae.decode(chunk, **kw) for chunk in summed.split(step)])

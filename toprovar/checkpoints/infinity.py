"""The tensors of official Infinity transformer and BSQ VAE checkpoints, with random values.

Names, shapes and order come from our own modules built on the meta device, renamed to the official
layout (`checkpoint_rename` inverted: `blocks.n.` -> `block_chunks.c.module.j.`); the tests hold
them against the official manifests (shared/reference/*.keys.json), key for key and in order.

Values: the official initialisation (`infinity/models/infinity.py`, `init_param.py`) where it gives
a working network: biases 0, norms about 1, `pos_start`/`lvl_embed` N(0, 1/(3C)), `cfg_uncond`
N(0, 1.2^2/Ct5), `ada_gss` N(0, 1/C). Elsewhere that init makes an untrained model inert (linear
N(0, 0.02), AdaLN and head scaled by 1e-3 and 0.02, proj by 1/sqrt(2 depth): every block an
identity, every bit a coin flip, attention uniform), so here: linear layers N(0, 1/fan_in) (unit
gain), the head twice that, and the log attention temperature `scale_mul` N(log 16, 1) per head.
Measured on a 32-block, C=512 copy at 0.06M pixels, fp32 CPU (the rules are the same at full size):
the residual stream grows from std 1.1 to 3.2 (max |x| 15, far from bf16 limits), bit logits have
std 1.9 (per-bit entropy 0.1 to 1.0 bit, mean 0.56), and the per-head attention entropy of the last
scale spreads from 1.6 nats to uniform (6.3): inputs the pruning policies can rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from toprovar.checkpoints.tensors import TensorSpec
from toprovar.models.checkpoint import expected_shapes, rename_keys
from toprovar.models.transformer import InfinityTransformer, TransformerConfig, checkpoint_rename
from toprovar.models.vae import VAEConfig, build_vae

_NORM = {"mean": 1.0, "std": 0.1}


def _transformer_init(name: str, shape: tuple[int, ...], config: TransformerConfig) -> dict[str, Any]:
    c = config.embed_dim
    if name.endswith("zero_k_bias"):  # a zero buffer of the official model
        return {}
    if name.endswith("scale_mul_1H11"):  # log attention temperature per head (official init log 4, cap log 100)
        return {"mean": math.log(16.0), "std": 1.0}
    if name.endswith("ada_gss"):  # official randn / sqrt(C), before special_init's x1e-3
        return {"std": c**-0.5}
    if name == "cfg_uncond":
        return {"std": 1.2 * config.text_channels**-0.5}
    if name in ("pos_start", "lvl_embed.weight") or name.endswith("mat_q"):
        return {"std": (3 * c) ** -0.5}
    if name.endswith("norm.weight"):
        return _NORM
    if name.endswith("bias"):
        return {}
    if name == "head.weight":  # bit logits of about +-2
        return {"std": 2 * shape[1] ** -0.5}
    return {"std": shape[1] ** -0.5}  # linear layers: unit gain, 1 / sqrt(fan_in)


def transformer_tensors(config: TransformerConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """The official checkpoint's tensors for `config`, in its order, stored as `dtype`."""
    with torch.device("meta"):
        model = InfinityTransformer(config)
    official = rename_keys(expected_shapes(model), {v: k for k, v in checkpoint_rename(config).items()})
    return [
        TensorSpec(name, tuple(shape), dtype, **_transformer_init(name, tuple(shape), config))
        for name, shape in official.items()
    ]


def _vae_init(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    if name.endswith("lfq.mask"):  # the bit weights 2^(d-1) ... 1 (a buffer, the same in every file)
        return {"values": tuple(2**i for i in range(shape[0] - 1, -1, -1))}
    if name.endswith("norm.weight"):
        return _NORM
    if name.endswith("bias"):
        return {}
    return {"std": math.prod(shape[1:]) ** -0.5}  # convolutions: unit gain, 1 / sqrt(fan_in)


def vae_tensors(config: VAEConfig | str) -> list[TensorSpec]:
    """The official VAE checkpoint's tensors (float32 weights, int64 bit masks), in its order."""
    model = build_vae(config, device="meta")
    return [
        TensorSpec(name, tuple(t.shape), t.dtype, **_vae_init(name, tuple(t.shape)))
        for name, t in model.state_dict().items()
    ]

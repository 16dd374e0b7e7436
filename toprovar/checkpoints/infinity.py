"""The tensors of official Infinity transformer and BSQ VAE checkpoints, with random values.

Names, shapes and order come from our own modules built on the meta device, renamed to the official
layout (`checkpoint_rename` inverted: `blocks.n.` -> `block_chunks.c.module.j.`); the tests hold
them against the official manifests (shared/reference/*.keys.json), key for key and in order.

Values follow the official initialisation (`infinity/models/infinity.py`, `init_param.py`: linear
weights N(0, 0.02), biases 0, norms 1, `pos_start`/`lvl_embed` N(0, 1/(3C)), `cfg_uncond`
N(0, 1.2^2/Ct5), `scale_mul` log 4), except where that init makes a block an identity: the
official `special_init` scales the AdaLN weights by 1e-3 and the head by 0.02, which would give
gates near 0 and every bit a 50/50 coin. Here AdaLN and head keep N(0, 0.02), so every block changes
the residual stream and the bit logits spread over about +-1 (a range of entropies for the pruning
policies to act on). Norm weights get 1 + N(0, 0.1) so they are not all the same number.
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
_OUTPUT_PROJECTIONS = ("sa.proj.weight", "ca.proj.weight", "ffn.fc2.weight")


def _transformer_init(name: str, config: TransformerConfig) -> dict[str, Any]:
    c = config.embed_dim
    if name.endswith("zero_k_bias"):  # a zero buffer of the official model
        return {}
    if name.endswith("scale_mul_1H11"):
        return {"mean": math.log(4.0), "std": 0.1}
    if name.endswith("ada_gss"):  # official randn / sqrt(C), before special_init's x1e-3
        return {"std": c ** -0.5}
    if name == "cfg_uncond":
        return {"std": 1.2 * config.text_channels ** -0.5}
    if name in ("pos_start", "lvl_embed.weight") or name.endswith("mat_q"):
        return {"std": (3 * c) ** -0.5}
    if name.endswith("norm.weight"):
        return _NORM
    if name.endswith("bias"):
        return {}
    if name.startswith("block_chunks.") and name.endswith(_OUTPUT_PROJECTIONS):  # special_init: 1/sqrt(2 depth)
        return {"std": 0.02 / math.sqrt(2 * config.depth)}
    return {"std": 0.02}


def transformer_tensors(config: TransformerConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """The official checkpoint's tensors for `config`, in its order, stored as `dtype`."""
    with torch.device("meta"):
        model = InfinityTransformer(config)
    official = rename_keys(expected_shapes(model), {v: k for k, v in checkpoint_rename(config).items()})
    return [TensorSpec(name, tuple(shape), dtype, **_transformer_init(name, config))
            for name, shape in official.items()]


def _vae_init(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    if name.endswith("lfq.mask"):  # the bit weights 2^(d-1) ... 1 (a buffer, the same in every file)
        return {"values": tuple(2 ** i for i in range(shape[0] - 1, -1, -1))}
    if name.endswith("norm.weight"):
        return _NORM
    if name.endswith("bias"):
        return {}
    return {"std": math.prod(shape[1:]) ** -0.5}  # convolutions: unit gain, 1 / sqrt(fan_in)


def vae_tensors(config: VAEConfig | str) -> list[TensorSpec]:
    """The official VAE checkpoint's tensors (float32 weights, int64 bit masks), in its order."""
    model = build_vae(config, device="meta")
    return [TensorSpec(name, tuple(t.shape), t.dtype, **_vae_init(name, tuple(t.shape)))
            for name, t in model.state_dict().items()]

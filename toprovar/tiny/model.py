"""The `tiny` backbone: Infinity's architecture at a size that trains in minutes and runs on a CPU.

Same code as infinity-2b (toprovar.models.transformer / vae), small configs:
  * transformer: 12 blocks, width 192, 3 heads of 64 (the Triton entropy kernel's head size),
    16 bits per token, text from a word-level encoder of width 128 (toprovar.tiny.text);
  * BSQ VAE: 8x8 pixels per latent cell, 16 bits, 128x128 RGB images;
  * schedule: 11 square scales 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16 (851 tokens), so scale, layer
    and token pruning all have room.
Weights live in the package (toprovar/assets/tiny/*.safetensors, float16), made by
`python -m toprovar.tiny.train`; MODEL_CARD.md beside them says how and how well.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from toprovar.errors import UserError
from toprovar.models.checkpoint import check_state_dict, expected_shapes
from toprovar.models.registry import (
    BackboneSpec,
    PromptSource,
    WeightPaths,
    register_backbone,
    register_text_encoder,
)
from toprovar.models.transformer import TransformerConfig
from toprovar.models.vae import VAEConfig
from toprovar.schedules import ScheduleFamily
from toprovar.tiny.text import TextEncoderConfig, WordTextEncoder

NAME = "tiny"
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny"
IMAGE_SIZE = 128

TINY_GRIDS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
TINY_SCHEDULES = ScheduleFamily(
    NAME,
    {1.0: tuple((g, g) for g in TINY_GRIDS)},
    {"0.016M": len(TINY_GRIDS)},
    pixels_per_token=IMAGE_SIZE // TINY_GRIDS[-1],
)

TEXT_WIDTH = 128
TEXT_MAX_WORDS = 32
TEXT_ORDER_LAYERS = 1  # new encoders; a file records its own count (older files: 0)

TINY_TRANSFORMER = TransformerConfig(
    depth=12,
    embed_dim=192,
    num_heads=3,
    codebook_dim=16,
    text_channels=TEXT_WIDTH,
    text_maxlen=TEXT_MAX_WORDS,
    pool_head_dim=64,
    block_chunks=1,
    num_levels=len(TINY_GRIDS),
    rope_grid=TINY_GRIDS[-1],
)
TINY_VAE = VAEConfig(
    codebook_dim=16,
    patch_size=IMAGE_SIZE // TINY_GRIDS[-1],
    ch=32,
    encoder_ch_mult=(1, 2, 4, 4),
    decoder_ch_mult=(1, 2, 4, 4),
    num_res_blocks=1,
    norm_groups=16,
)

WEIGHTS = WeightPaths(
    transformer=str(ASSETS / "transformer.safetensors"),
    vae=str(ASSETS / "vae.safetensors"),
    text_encoder=str(ASSETS / "text_encoder.safetensors"),
)

# Generation defaults, chosen on held-out prompts after training (MODEL_CARD.md).
DEFAULT_GUIDANCE_SCALE = 3.0  # best of 2, 3, 4 on held-out and fresh prompts
DEFAULT_TEMPERATURE = 1.0


def scene_prompts(count: int, seed: int) -> tuple[list[str], list]:
    """`count` captioned procedural scenes of `seed` (toprovar.tiny.scenes): captions, scenes."""
    from toprovar.tiny.scenes import sample_scenes  # lazy: rendering code, only needed when asked

    scenes = sample_scenes(count, seed=seed)
    return [scene.caption for scene in scenes], list(scenes)


def geneval_lite(images: torch.Tensor, prompts) -> tuple:
    """geneval-lite (toprovar.tiny.evaluate): binary and share scores per image."""
    from toprovar.tiny.evaluate import geneval_lite_scores  # lazy: scipy

    return geneval_lite_scores(images, prompts)


TINY_SPEC = BackboneSpec(
    name=NAME,
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    text_encoder="tiny-words",
    weights=WEIGHTS,
    pixels="0.016M",
    guidance_scale=DEFAULT_GUIDANCE_SCALE,
    temperature=DEFAULT_TEMPERATURE,
    schedules=TINY_SCHEDULES,
    prompt_source=PromptSource("tiny_scenes", scene_prompts),
    geneval=geneval_lite,
)


def text_encoder_config(vocabulary: tuple[str, ...], order_layers: int = TEXT_ORDER_LAYERS) -> TextEncoderConfig:
    return TextEncoderConfig(
        vocabulary=vocabulary, width=TEXT_WIDTH, max_words=TEXT_MAX_WORDS, order_layers=order_layers
    )


# -- the text encoder's file: weights + vocabulary in the safetensors metadata -------------------------


def save_text_encoder(encoder: WordTextEncoder, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in encoder.state_dict().items()}
    save_file(
        state,
        str(path),
        metadata={
            "vocabulary": json.dumps(list(encoder.config.vocabulary)),
            "order_layers": str(encoder.config.order_layers),
        },
    )


def load_text_encoder(
    path: str | Path | None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> WordTextEncoder:
    """Read the encoder (and its vocabulary) from one safetensors file; one-line errors."""
    from safetensors import SafetensorError, safe_open

    if path is None:
        raise UserError(f"backbone '{NAME}' has no text_encoder weights; set backbone.weights.text_encoder=/path")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tiny text encoder weights not found; set backbone.weights.text_encoder=/path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if "vocabulary" not in meta:
        raise UserError(f"{path}: no vocabulary in the file's metadata; is this a tiny text encoder?")
    with torch.device("meta"):
        encoder = WordTextEncoder(
            text_encoder_config(tuple(json.loads(meta["vocabulary"])), int(meta.get("order_layers", 0)))
        )
    check_state_dict(expected_shapes(encoder), state, path)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def register() -> None:
    register_text_encoder("tiny-words", load_text_encoder)
    register_backbone(TINY_SPEC, replace_existing=True)

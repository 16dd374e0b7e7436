"""A CLIP model folder with random weights, for `quality.clip` without a download:
`python benchmarks/random_clip.py OUT [--preset test|vit-l-14] [--seed 0]`.

What `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained` read, written the way
`save_pretrained` writes it: config.json and model.safetensors (a CLIPModel from a CLIPConfig,
transformers' own init), preprocessor_config.json (CLIPImageProcessor: shortest side, centre crop,
CLIP's mean and std) and a tokenizer made with the `tokenizers` library in CLIP's shape:
lower-cased, byte-level, every word ending in `</w>`, `<|startoftext|>` = 0 and `<|endoftext|>` = 1
around every text (the end token also pads). Its vocabulary is the 256 byte symbols with and without
`</w>` and no merges, so a prompt takes one token a character (real CLIP: about one a word) and the
77-token context holds ~75 characters. The real code path, unreal weights: the scores mean nothing.

Presets: `test` (2 layers of width 32, 32 px images: seconds on a CPU) and `vit-l-14` (the shapes of
openai/clip-vit-large-patch14, 0.43 B parameters: what a real CLIPScore costs on the GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"
PRESETS = {
    "test": {
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        "projection_dim": 16,
    },
    "vit-l-14": {
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        "projection_dim": 768,
    },
}


def build_tokenizer():
    """CLIP-shaped byte-level tokenizer (module docstring) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {START: 0, END: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, 0), (END, 1)]
    )
    return tokenizer


def write_random_clip(out: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """Write a random CLIP folder (module docstring) to `out`; returns it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shapes = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": START,
                "eos_token": END,
                "unk_token": END,
                "pad_token": END,
            },
            indent=2,
        )
        + "\n"
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.get_vocab_size(),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **shapes["text"],
        ),
        vision_config=shapes["vision"],
        projection_dim=shapes["projection_dim"],
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    side = shapes["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", default="test", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_clip(args.out, args.preset, args.seed))


if __name__ == "__main__":
    main()

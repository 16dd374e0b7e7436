"""The `tiny` backbone's text encoder: a word-level vocabulary and a 2-layer transformer encoder.

Tiny captions come from a small closed grammar (toprovar.tiny.scenes), so a learned embedding per
word plus two self-attention layers gives the context a T5 would (which colour goes with which
shape), at a size that ships in the repo. It is trained together with the transformer
(toprovar.tiny.train). The vocabulary travels inside the weight file, so a checkpoint is
self-contained. Words outside it are dropped with a warning; prompts longer than `max_words`
are truncated with a warning (as the T5 wrapper does).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from toprovar.models.text_encoder import TextFeatures

PAD = "<pad>"


def split_words(prompt: str) -> list[str]:
    """Lower-case words; punctuation is dropped."""
    return re.findall(r"[a-z]+", prompt.lower())


@dataclass(frozen=True)
class TextEncoderConfig:
    vocabulary: tuple[str, ...]  # index 0 is PAD
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_words: int = 32
    # Causal layers after the bidirectional ones: there a word sees only the words before it, so the
    # noun phrase after "left of" differs from the one before it. Trained without them, the model was
    # blind to word order ("A left of B" and "B left of A" gave the same loss to 1e-4).
    order_layers: int = 0

    def __post_init__(self) -> None:
        if not self.vocabulary or self.vocabulary[0] != PAD:
            raise ValueError(f"the vocabulary must start with {PAD!r}")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("the vocabulary has duplicate words")


class WordTextEncoder(nn.Module):
    """`encode(prompts) -> TextFeatures` of width `config.width`, one feature row per word."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.index = {word: i for i, word in enumerate(config.vocabulary)}
        self.word = nn.Embedding(len(config.vocabulary), config.width)
        self.position = nn.Embedding(config.max_words, config.width)
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            2 * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.order = None
        if config.order_layers:
            self.order = nn.TransformerEncoder(layer, config.order_layers, enable_nested_tensor=False)
            for block in self.order.layers:  # residual branches start at zero: added to a trained encoder,
                for proj in (block.self_attn.out_proj, block.linear2):  # they change nothing until trained
                    nn.init.zeros_(proj.weight)
                    nn.init.zeros_(proj.bias)
        self.norm = nn.LayerNorm(config.width)

    @property
    def hidden_size(self) -> int:
        return self.config.width

    @property
    def device(self) -> torch.device:
        return self.word.weight.device

    def tokenize(self, prompts: Sequence[str], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
        """Word ids `(B, L)` (0 = padding; L = the longest prompt, or `pad_to`) and lengths `(B,)`;
        warns about unknown / extra words."""
        ids, unknown, truncated = [], set(), False
        for prompt in prompts:
            words = split_words(prompt)
            unknown.update(w for w in words if w not in self.index)
            row = [self.index[w] for w in words if w in self.index]
            if len(row) > self.config.max_words:
                row, truncated = row[: self.config.max_words], True
            ids.append(row or [0])  # an empty prompt still gets one (padding) token
        if unknown:
            warnings.warn(
                f"the tiny text encoder does not know {', '.join(sorted(unknown))}; those words "
                f"are ignored (it knows the {len(self.index) - 1} words of the scene captions)",
                stacklevel=2,
            )
        if truncated:
            warnings.warn(
                f"prompt longer than the tiny text encoder's limit of {self.config.max_words} words; truncated",
                stacklevel=2,
            )
        lens = torch.tensor([len(r) for r in ids], dtype=torch.int32)
        out = torch.zeros(len(ids), max(int(lens.max()), pad_to or 0), dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row)
        return out, lens

    def forward(self, ids: Tensor, lens: Tensor) -> TextFeatures:
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lens.to(ids.device)[:, None]
        x = self.word(ids) + self.position.weight[: ids.shape[1]][None]
        x = self.layers(x, src_key_padding_mask=~mask)
        if self.order is not None:
            n = ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)  # True: may not attend
            x = self.order(x, mask=causal, src_key_padding_mask=~mask, is_causal=True)
        x = self.norm(x)
        return TextFeatures(x * mask[..., None], mask, lens.to(ids.device))

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        ids, lens = self.tokenize(list(prompts))
        with torch.inference_mode():
            return self(ids.to(self.device), lens)

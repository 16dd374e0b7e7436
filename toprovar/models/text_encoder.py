"""Text encoders: prompts -> padded token features with a mask.

`TextEncoder` is the protocol the pipeline relies on (the `tiny` backbone ships its own encoder).
`T5TextEncoder` wraps Flan-T5 (Infinity uses flan-t5-xl) through transformers, from a local
folder only: no hub access, and a missing or incomplete folder is a one-line `UserError`.

Official Infinity pads every prompt to 512 tokens before the encoder; we pad to the longest prompt
of the batch instead. With the attention mask that gives the same features for the real tokens
(T5 uses relative position biases and masks padded keys), at a fraction of the cost.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.errors import UserError

__all__ = ["TextFeatures", "PackedText", "TextEncoder", "T5TextEncoder"]


@dataclass
class PackedText:
    """The official packed form (`text_cond_tuple`) for varlen cross-attention."""

    kv_compact: Tensor  # (sum(lens), C): real tokens of all prompts, concatenated
    lens: list[int]  # tokens per prompt
    cu_seqlens: Tensor  # (B + 1,) int32 cumulative lengths, starting at 0
    max_len: int  # longest prompt

    def as_tuple(self) -> tuple[Tensor, list[int], Tensor, int]:
        """`(kv_compact, lens, cu_seqlens_k, Ltext)` exactly as official `encode_prompt` returns."""
        return self.kv_compact, self.lens, self.cu_seqlens, self.max_len


@dataclass
class TextFeatures:
    """Encoded prompts, right-padded: row b holds `lens[b]` real tokens then zeros."""

    features: Tensor  # (B, L, C) float, zero at padding
    mask: Tensor  # (B, L) bool, True at real tokens
    lens: Tensor  # (B,) int32, real tokens per prompt (on the features' device)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.features.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        return TextFeatures(self.features.to(device=device, dtype=dtype), self.mask.to(device), self.lens.to(device))

    def packed(self) -> PackedText:
        """Official packed form. Reads `lens` on the host once (one sync per call)."""
        lens = self.lens.tolist()
        cu = F.pad(self.lens.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return PackedText(self.features[self.mask], lens, cu, max(lens))


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into `TextFeatures` of width `hidden_size`."""

    max_length: int
    hidden_size: int

    def encode(self, prompts: Sequence[str]) -> TextFeatures: ...


_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def _check_folder(path: Path) -> None:
    hint = "point the backbone's text_encoder weight path at a local Flan-T5 folder"
    if not path.is_dir():
        raise UserError(f"{path}: text encoder folder not found ({hint})")
    if not (path / "config.json").is_file():
        raise UserError(f"{path / 'config.json'}: missing; not a transformers model folder ({hint})")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise UserError(f"{path}: no T5 weights (expected one of {', '.join(_WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer (expected {' or '.join(_TOKENIZER_FILES)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _tied_keys(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied.keys() if isinstance(tied, dict) else tied)


class T5TextEncoder:
    """Flan-T5 encoder + tokenizer; features are the encoder's last hidden state in float32."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_length: int = 512):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for a token and </s>), got {max_length}")
        self.tokenizer = tokenizer
        self.tokenizer.model_max_length = max_length
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.hidden_size = int(model.config.d_model)

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        max_length: int = 512,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> T5TextEncoder:
        """Load tokenizer and encoder from a local folder (never the hub).

        `dtype` defaults to float16 on CUDA (as official Infinity) and float32 elsewhere.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path).expanduser()
        _check_folder(path)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, legacy=True)
        except Exception as err:
            raise UserError(f"{path}: cannot load the tokenizer ({_first_line(err)})") from None
        try:
            model, info = T5EncoderModel.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True, **_dtype_kwarg(dtype)
            )
        except Exception as err:
            raise UserError(f"{path}: cannot load the T5 encoder ({_first_line(err)})") from None
        # transformers fills missing weights with random values and only warns: refuse instead.
        missing = sorted(set(info.get("missing_keys", ())) - _tied_keys(model))
        mismatched = list(info.get("mismatched_keys", ()))
        if missing:
            raise UserError(
                f"{path}: T5 weights lack '{missing[0]}' ({len(missing)} missing in all); "
                "is this a complete Flan-T5 folder?"
            )
        if mismatched:
            key = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
            raise UserError(f"{path}: T5 weight '{key}' has the wrong shape for config.json")
        return cls(tokenizer, model.to(device=device, dtype=dtype), max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens per prompt before truncation (including </s>)."""
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        for i, (prompt, n) in enumerate(zip(prompts, self.token_counts(prompts))):
            if n > self.max_length:
                warnings.warn(
                    f"prompt {i} has {n} tokens, more than the text encoder's limit of "
                    f"{self.max_length}; truncated: {prompt[:60]!r}",
                    stacklevel=2,
                )
        tokens = self.tokenizer(
            prompts, max_length=self.max_length, truncation=True, padding="longest", return_tensors="pt"
        )
        device = self.device
        ids = tokens["input_ids"].to(device, non_blocking=True)
        mask = tokens["attention_mask"].to(device, non_blocking=True)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        keep = mask.bool()
        return TextFeatures(hidden.masked_fill(~keep[..., None], 0.0), keep, mask.sum(-1, dtype=torch.int32))


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}

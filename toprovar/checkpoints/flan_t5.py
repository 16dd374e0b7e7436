"""A Flan-T5 folder with random weights: config.json, encoder weights, and a T5-shaped tokenizer.

`config.json` holds google/flan-t5-xl's architecture (or a 2-layer T5 of another width for the small
test backbones); the weights are the encoder's (`shared.weight` + `encoder.*`, all that
`T5EncoderModel` reads; the tied `encoder.embed_tokens.weight` is left out as `save_pretrained` does),
float32 as the official files, drawn with T5's own init (`T5PreTrainedModel._init_weights`).

The tokenizer is built here with the `tokenizers` library in T5's shape: a Unigram model of 32100
pieces, `<pad>`=0, `</s>`=1, `<unk>`=2, `<extra_id_99>` ... `<extra_id_0>` = 32000 ... 32099,
Metaspace pre-tokenizer, `</s>` appended to every text, padding with `<pad>`. Its 31997 ordinary
pieces are the word-start mark, then every printable ASCII character, every lowercase 2-letter
string and lowercase 3-letter strings from `aaa` to `wnr`, each with and without the word-start
mark: English prompts take about as many tokens as with the real vocabulary (1-3 per word) and
ASCII never hits `<unk>`.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path
from typing import Any

import torch

from toprovar.checkpoints.tensors import TensorSpec

# google/flan-t5-xl config.json (architecture fields).
FLAN_T5_XL: dict[str, Any] = {
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "tie_word_embeddings": False,
    "n_positions": 512,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
EXTRA_IDS = 100
VOCAB_PIECES = 32000  # sentencepiece pieces incl. the 3 special tokens; the <extra_id_*> follow
MODEL_MAX_LENGTH = 512
_SPACE = "\u2581"


def t5_config_values(d_model: int) -> dict[str, Any]:
    """config.json: flan-t5-xl's for T5 features of width 2048, else a 2-layer, 2-head T5 of width `d_model`."""
    values = dict(FLAN_T5_XL)
    if d_model != FLAN_T5_XL["d_model"]:
        values.update(
            d_model=d_model,
            d_kv=max(1, d_model // 2),
            num_heads=2,
            d_ff=2 * d_model,
            num_layers=2,
            num_decoder_layers=2,
        )
    # Only the encoder is stored, so the folder names the class that reads all of it.
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", **values}


def _t5_init(name: str, config) -> dict[str, Any]:
    d_model, d_kv, heads = config.d_model, config.d_kv, config.num_heads  # a T5Config
    if name.endswith("layer_norm.weight"):
        return {"mean": 1.0}
    if name == "shared.weight":
        return {"std": 1.0}
    if name.endswith(".q.weight"):
        return {"std": (d_model * d_kv) ** -0.5}
    if name.endswith(".o.weight"):
        return {"std": (heads * d_kv) ** -0.5}
    if name.endswith(".wo.weight"):
        return {"std": config.d_ff**-0.5}
    return {"std": d_model**-0.5}  # k, v, wi_0, wi_1, relative_attention_bias


def t5_tensors(values: dict[str, Any]) -> list[TensorSpec]:
    """The encoder weights `T5EncoderModel` loads for config.json `values`, float32, in its state-dict order."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{k: v for k, v in values.items() if k != "model_type"})
    with torch.device("meta"):
        model = T5EncoderModel(config)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return [
        TensorSpec(name, tuple(t.shape), torch.float32, **_t5_init(name, config))
        for name, t in model.state_dict().items()
        if name not in tied
    ]


def _pieces() -> list[str]:
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    words = [*chars, *("".join(p) for n in (2, 3) for p in itertools.product(string.ascii_lowercase, repeat=n))]
    pieces = [_SPACE, *(form for w in words for form in (_SPACE + w, w))]
    return pieces[: VOCAB_PIECES - len(SPECIAL_TOKENS)]


def build_tokenizer():
    """The T5-shaped `tokenizers.Tokenizer` (deterministic: no training, a fixed vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)]
    # Equal scores: the fewest pieces win, i.e. the longest matches.
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + [(p, -10.0) for p in _pieces()] + [(t, 0.0) for t in extra]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    # transformers' T5Tokenizer rebuilds exactly this pre-tokenizer and decoder when it loads the file.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIAL_TOKENS.index("</s>"))]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*SPECIAL_TOKENS, *extra]])
    tok.enable_padding(pad_id=SPECIAL_TOKENS.index("<pad>"), pad_token="<pad>")
    return tok


def write_config_and_tokenizer(folder: Path, values: dict[str, Any]) -> None:
    """config.json, tokenizer.json, tokenizer_config.json and special_tokens_map.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer_config = {
        **special,
        "extra_ids": EXTRA_IDS,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "T5Tokenizer",
    }
    files = {"config.json": values, "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")

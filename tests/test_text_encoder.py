"""T5 text encoder wrapper on a tiny random T5 saved to a temp folder (offline: the tokenizer is a
small unigram model built with the `tokenizers` library)."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toprovar.errors import UserError
from toprovar.models.text_encoder import T5TextEncoder, TextEncoder, TextFeatures

WORDS = "a the red blue green yellow cube sphere cone dog cat on left right of above below small large".split()


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    _save_tokenizer(folder)
    torch.manual_seed(random.randrange(2**31))
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        num_heads=2,
        num_layers=2,
        d_ff=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(t5_folder) -> T5TextEncoder:
    return T5TextEncoder.from_folder(t5_folder, max_length=24)


def _prompts(n: int, max_words: int = 8) -> list[str]:
    return [" ".join(random.choices(WORDS, k=random.randint(1, max_words))) for _ in range(n)]


def test_is_a_text_encoder(encoder):
    assert isinstance(encoder, TextEncoder)
    assert encoder.hidden_size == 16 and encoder.max_length == 24


def test_features_mask_and_lens(encoder):
    prompts = _prompts(4)
    out = encoder.encode(prompts)
    counts = encoder.token_counts(prompts)
    assert isinstance(out, TextFeatures) and len(out) == 4
    assert out.features.shape == (4, max(counts), 16) and out.features.dtype == torch.float32
    assert out.lens.tolist() == counts and out.lens.dtype == torch.int32
    positions = torch.arange(out.mask.shape[1])
    assert torch.equal(out.mask, positions[None] < out.lens[:, None])  # right padding
    assert torch.all(out.features[~out.mask] == 0)


def test_same_features_alone_in_batch_and_with_official_padding(encoder):
    """Padding to the longest prompt gives the official (pad to max_length) features."""
    prompts = _prompts(3)
    batch = encoder.encode(prompts)
    for i, prompt in enumerate(prompts):
        n = int(batch.lens[i])
        alone = encoder.encode([prompt])
        torch.testing.assert_close(batch.features[i, :n], alone.features[0, :n], rtol=1e-5, atol=1e-5)
        tok = encoder.tokenizer(
            [prompt], max_length=encoder.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            official = encoder.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        torch.testing.assert_close(batch.features[i, :n], official[0, :n].float(), rtol=1e-5, atol=1e-5)


def test_long_prompt_is_truncated_with_one_warning(encoder):
    long_prompt = " ".join(random.choices(WORDS, k=40))
    short = _prompts(1)[0]
    with pytest.warns(UserWarning, match="prompt 1 has .* limit of 24; truncated") as record:
        out = encoder.encode([short, long_prompt])
    assert len(record) == 1
    assert int(out.lens[1]) == 24
    tok = encoder.tokenizer([long_prompt], max_length=24, truncation=True)
    assert tok["input_ids"][0][-1] == encoder.tokenizer.eos_token_id  # still ends with </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode([short])  # within the limit: silent


def test_packed_matches_official_construction(encoder):
    feats = encoder.encode(_prompts(5))
    packed = feats.packed()
    lens = feats.mask.sum(-1).tolist()
    kv = torch.cat([f[:n] for n, f in zip(lens, feats.features.unbind(0))], dim=0)
    cu = F.pad(feats.mask.sum(-1).to(torch.int32).cumsum(0), (1, 0))
    kv_compact, lens_out, cu_out, max_len = packed.as_tuple()
    assert torch.equal(kv_compact, kv) and lens_out == lens and max_len == max(lens)
    assert torch.equal(cu_out, cu) and cu_out.dtype == torch.int32


def test_to_moves_and_casts(encoder):
    feats = encoder.encode(_prompts(2)).to(dtype=torch.bfloat16)
    assert feats.features.dtype == torch.bfloat16 and feats.mask.dtype == torch.bool


# ----------------------------------------------------------------------------- one-line errors


def _copy(src: Path, dst: Path, skip: tuple[str, ...]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _assert_one_line(folder: Path, *fragments: str) -> None:
    with pytest.raises(UserError) as info:
        T5TextEncoder.from_folder(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in (str(folder), *fragments):
        assert fragment in message


def test_missing_folder(tmp_path):
    _assert_one_line(tmp_path / "flan-t5-xl", "not found")


def test_missing_config(t5_folder, tmp_path):
    _assert_one_line(_copy(t5_folder, tmp_path / "t5", ("config.json",)), "config.json")


def test_missing_tokenizer(t5_folder, tmp_path):
    _assert_one_line(_copy(t5_folder, tmp_path / "t5", ("tokenizer.json",)), "tokenizer")


def test_missing_weights(t5_folder, tmp_path):
    _assert_one_line(_copy(t5_folder, tmp_path / "t5", ("model.safetensors",)), "weights")


def test_incomplete_weights_name_the_key(t5_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(t5_folder, tmp_path / "t5", ())
    state = load_file(folder / "model.safetensors")
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    del state[key]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _assert_one_line(folder, key)

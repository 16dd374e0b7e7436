"""VAE checkpoints: official key manifests map 1:1 onto our modules, strict loading, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toprovar.errors import UserError
from toprovar.models.checkpoint import check_state_dict, expected_shapes
from toprovar.models.vae import build_vae, load_vae

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MANIFESTS = {"d32": "vae_d32.keys.json", "d14_patchify": "vae_d14_patchify.keys.json"}


@pytest.mark.parametrize("preset", sorted(MANIFESTS))
def test_official_manifest_is_consumed_exactly(preset):
    path = REFERENCE / MANIFESTS[preset]
    if not path.is_file():
        pytest.skip(f"{path} not present (shared reference folder missing)")
    manifest = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    vae = build_vae(preset, device="meta")
    assert expected_shapes(vae) == manifest  # every key, exact shapes, nothing extra
    # A state dict shaped like the manifest passes the strict check and loads (no renames).
    state = {
        k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("lfq.mask") else torch.float32)
        for k, s in manifest.items()
    }
    check_state_dict(expected_shapes(vae), state, path)
    vae.load_state_dict(state, strict=True, assign=True)


def _save(tmp_path: Path, state: dict, name: str = "vae.pth") -> Path:
    path = tmp_path / name
    torch.save({"vae": state}, path)  # official layout: weights under "vae"
    return path


@pytest.fixture
def saved(tmp_path):
    vae = build_vae("test")
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_()
    return vae, _save(tmp_path, vae.state_dict())


def test_load_round_trip_is_exact_and_frozen(saved):
    vae, path = saved
    loaded = load_vae(path, "test")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(img), vae.eval().encode(img))


def test_load_to_dtype_keeps_integer_mask(saved):
    _, path = saved
    loaded = load_vae(path, "test", dtype=torch.bfloat16)
    assert loaded.encoder.conv_in.conv.weight.dtype == torch.bfloat16
    assert loaded.quantizer.lfq.mask.dtype == torch.int64


def _one_line_error(path: Path, *fragments: str, preset: str = "test") -> None:
    with pytest.raises(UserError) as info:
        load_vae(path, preset)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "absent.pth", "not found")


def test_wrong_shape(saved, tmp_path):
    vae, _ = saved
    state = vae.state_dict()
    key = "decoder.conv_in.conv.weight"
    state[key] = torch.randn(state[key].shape[0], state[key].shape[1] + 1, 3, 3)
    _one_line_error(_save(tmp_path, state, "bad_shape.pth"), key, "shape")


def test_missing_key(saved, tmp_path):
    vae, _ = saved
    state = vae.state_dict()
    del state["encoder.mid.block_1.conv2.conv.bias"]
    _one_line_error(_save(tmp_path, state, "missing.pth"), "encoder.mid.block_1.conv2.conv.bias", "missing")


def test_unexpected_key(saved, tmp_path):
    vae, _ = saved
    state = {**vae.state_dict(), "encoder.mid.attn_1.q.conv.weight": torch.randn(4, 4, 1, 1)}
    _one_line_error(_save(tmp_path, state, "extra.pth"), "encoder.mid.attn_1.q.conv.weight", "unexpected")


def test_checkpoint_of_another_preset(saved):
    _, path = saved
    _one_line_error(path, "encoder", preset="d32")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    _one_line_error(path, "cannot be read")


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown VAE preset 'd99'"):
        build_vae("d99", device="meta")

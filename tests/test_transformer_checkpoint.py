"""Checkpoint layout of the Infinity transformer: official manifests, rename map, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.backbones import SMALL_PATCHIFY
from toprovar.errors import UserError
from toprovar.models.checkpoint import check_state_dict, expected_shapes, rename_keys
from toprovar.models.registry import build_transformer, get_backbone
from toprovar.models.transformer import (
    TRANSFORMER_PRESETS,
    InfinityTransformer,
    TransformerConfig,
    checkpoint_rename,
    random_state_dict,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MANIFESTS = {"infinity-2b": "infinity_2b.keys.json", "infinity-8b": "infinity_8b.keys.json"}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_official_manifest_is_consumed_exactly(name: str) -> None:
    manifest_path = REFERENCE / MANIFESTS[name]
    if not manifest_path.is_file():
        pytest.skip(f"reference manifest {manifest_path} not present")
    manifest = json.loads(manifest_path.read_text())
    config = TRANSFORMER_PRESETS[name]
    with torch.device("meta"):
        model = InfinityTransformer(config)
        state = {k: torch.empty(shape) for k, shape in manifest.items()}
    renamed = rename_keys(state, checkpoint_rename(config))
    expected = expected_shapes(model)
    assert len(renamed) == len(manifest), "rename map must be one to one"
    assert set(renamed) == set(expected)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == expected
    check_state_dict(expected, renamed, manifest_path)  # the loader's own check agrees


def test_rename_map_flattens_block_chunks() -> None:
    config = TRANSFORMER_PRESETS["infinity-2b"]
    rename = checkpoint_rename(config)
    assert len(rename) == config.depth
    assert rename["block_chunks.0.module.0."] == "blocks.0."
    assert rename["block_chunks.7.module.3."] == "blocks.31."
    assert sorted(rename.values(), key=lambda p: int(p.split(".")[1])) == [f"blocks.{i}." for i in range(32)]


def _official_layout(state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our state dict written under the official block_chunks names."""
    inverse = {v: k for k, v in checkpoint_rename(config).items()}
    return rename_keys(state, inverse)


@pytest.fixture
def small_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    state = random_state_dict(SMALL_PATCHIFY, seed=seed)
    path = tmp_path / "small.pth"
    torch.save(_official_layout(state, SMALL_PATCHIFY), path)
    return path, state


def test_loads_official_layout_file(small_checkpoint) -> None:
    path, state = small_checkpoint
    spec = get_backbone("test-small-patchify")
    model = build_transformer(spec, str(path), torch.device("cpu"), torch.float32)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_loads_sharded_folder(tmp_path: Path) -> None:
    state = _official_layout(random_state_dict(SMALL_PATCHIFY, seed=3), SMALL_PATCHIFY)
    keys = sorted(state)
    shards = {"part-1.bin": keys[: len(keys) // 2], "part-2.bin": keys[len(keys) // 2 :]}
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, tmp_path / fname)
    weight_map = {k: fname for fname, ks in shards.items() for k in ks}
    (tmp_path / "model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = build_transformer(get_backbone("test-small-patchify"), str(tmp_path), torch.device("cpu"), torch.float32)
    assert torch.equal(model.blocks[1].sa.mat_qkv.weight, state["block_chunks.1.module.0.sa.mat_qkv.weight"])


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(UserError) as info:
        build_transformer(get_backbone("test-small-patchify"), str(path), torch.device("cpu"), torch.float32)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message
    return message


def test_wrong_shape_names_file_and_key(small_checkpoint) -> None:
    path, state = small_checkpoint
    bad = _official_layout(state, SMALL_PATCHIFY)
    bad["head.weight"] = torch.randn(7, 64)
    torch.save(bad, path)
    _one_line_error(path, "'head.weight'")


def test_missing_key_names_file_and_key(small_checkpoint) -> None:
    path, state = small_checkpoint
    bad = _official_layout(state, SMALL_PATCHIFY)
    del bad["block_chunks.1.module.0.ffn.fc1.bias"]
    torch.save(bad, path)
    _one_line_error(path, "'blocks.1.ffn.fc1.bias'")


def test_unexpected_key_is_an_error(small_checkpoint) -> None:
    path, state = small_checkpoint
    bad = _official_layout(state, SMALL_PATCHIFY)
    bad["extra.weight"] = torch.randn(3)
    torch.save(bad, path)
    _one_line_error(path, "'extra.weight'")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.pth", "not found")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    _one_line_error(junk, "cannot be read")


def test_official_backbone_without_weights_is_a_one_line_error(tmp_path: Path) -> None:
    from toprovar.models.registry import build_backbone

    with pytest.raises(UserError) as info:
        build_backbone("infinity-2b", weights={"transformer": str(tmp_path / "infinity_2b_reg.pth")}, device="cpu")
    assert "infinity_2b_reg.pth" in str(info.value) and "\n" not in str(info.value)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(UserError, match="infinity-2b.*infinity-8b"):
        get_backbone("infinity-3b")

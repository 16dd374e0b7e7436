"""Read checkpoints from local paths and load them strictly, with one-line errors.

Supported inputs:
  * a single file: `.pth`/`.pt`/`.bin` (torch.load, weights only) or `.safetensors`;
    common wrappers ({"state_dict": ...}, {"model": ...}, {"vae": ...},
    {"trainer": {"gpt_fsdp": ...}}) are unwrapped;
  * a folder of shards: an HF-style `*.index.json` with a `weight_map`, or else every
    `*.safetensors` / `*.bin` / `*.pth` file in it.

`load_into` checks that every key the module expects is present with exactly the expected
shape and that nothing else is left over; a mismatch names the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from toprovar.errors import UserError

_WRAPPER_KEYS = ("state_dict", "model", "module", "vae", "ema")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "trainer" in obj and isinstance(obj["trainer"], Mapping):
        trainer = obj["trainer"]
        for key in ("gpt_fsdp", "gpt_ema_fsdp"):
            if key in trainer:
                return _unwrap(trainer[key], path)
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) // 2:
            return dict(tensors)
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
    raise UserError(
        f"{path}: not a state dict (no tensors found at the top level or under "
        f"{', '.join(_WRAPPER_KEYS)}, trainer.gpt_fsdp)"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except UserError:
        raise
    except Exception as err:  # corrupt file, pickle of something else, truncated download
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot be read as a checkpoint ({first})") from None
    return _unwrap(obj, path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or a folder of shards into one flat state dict (on CPU)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"{path}: checkpoint not found (set the backbone's weight path override to a local file or folder)"
        )
    if path.is_file():
        return _read_file(path)
    indexes = sorted(path.glob("*.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise UserError(f"{indexes[0]}: not a shard index with a 'weight_map' ({err})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UserError(f"{path / missing[0]}: shard listed in {indexes[0].name} is missing")
        files = [path / s for s in shards]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        if not files:
            raise UserError(f"{path}: folder holds no *.index.json, *.safetensors, *.bin or *.pth shards")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_file(f))
    return state


def rename_keys(state: Mapping[str, torch.Tensor], rename: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Apply prefix renames (checkpoint prefix -> module prefix); the longest prefix wins."""
    prefixes = sorted(rename, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = rename[p] + key[len(p) :]
                break
        out[key] = value
    return out


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Keys and shapes the module's state dict holds (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    ignore: tuple[str, ...] = (),
) -> None:
    """Raise a one-line UserError on the first missing, unexpected or mis-shaped key."""
    for key, shape in expected.items():
        if key not in state:
            raise UserError(
                f"{source}: missing key '{key}' (expected shape {list(shape)}); "
                "is this the right checkpoint for the backbone?"
            )
        got = tuple(state[key].shape)
        if got != tuple(shape):
            raise UserError(
                f"{source}: key '{key}' has shape {list(got)}, expected {list(shape)}; "
                "is this the right checkpoint for the backbone?"
            )
    extra = [k for k in state if k not in expected and not k.startswith(ignore)]
    if extra:
        raise UserError(
            f"{source}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all); "
            "is this the right checkpoint for the backbone?"
        )


def load_into(
    module: nn.Module, path: str | Path, rename: Mapping[str, str] | None = None, ignore: tuple[str, ...] = ()
) -> nn.Module:
    """Read `path`, rename prefixes, check every key and shape, then load (assign on meta)."""
    state = read_state_dict(path)
    if rename:
        state = rename_keys(state, rename)
    check_state_dict(expected_shapes(module), state, path, ignore)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    on_meta = any(p.is_meta for p in module.parameters())
    module.load_state_dict(state, strict=True, assign=on_meta)
    return module

"""Backbones from outside the package: modules named in $TOPROVAR_EXTRA_BACKBONES (comma-separated,
e.g. `tests.backbones`, a checkout's small test backbones) register backbones when the registry is
first asked, and the `conf/` folder beside each one holds its Hydra config groups (`backbone/<name>.yaml`,
`prompts/<name>.yaml`), which the apps search after toprovar/conf/. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from toprovar.errors import UserError

EXTRA_BACKBONES_ENV = "TOPROVAR_EXTRA_BACKBONES"


def extra_backbone_modules() -> list[str]:
    """The module names in $TOPROVAR_EXTRA_BACKBONES (empty when unset)."""
    return [name.strip() for name in os.environ.get(EXTRA_BACKBONES_ENV, "").split(",") if name.strip()]


def missing_module(name: str) -> UserError:
    return UserError(f"{EXTRA_BACKBONES_ENV} names module '{name}', which cannot be imported (is it on PYTHONPATH?)")


def extra_conf_dirs() -> list[Path]:
    """The `conf/` folders beside those modules, found without importing them (the apps call this
    before Hydra makes a run folder, so a module that cannot be found is a one-line UserError here)."""
    folders = []
    for name in extra_backbone_modules():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            raise missing_module(name)
        if (Path(spec.origin).parent / "conf").is_dir():
            folders.append(Path(spec.origin).parent / "conf")
    return folders


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds `extra_conf_dirs()` to the config search path (none without any);
    UserError as `extra_conf_dirs`."""
    folders = extra_conf_dirs()
    return [f"hydra.searchpath=[{','.join(f'file://{folder}' for folder in folders)}]"] if folders else []

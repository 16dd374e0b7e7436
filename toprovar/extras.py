"""Backbones from outside the package: modules named in $TOPROVAR_EXTRA_BACKBONES (comma-separated,
e.g. `tests.backbones`, a checkout's small test backbones) register backbones when the registry is
first asked, and the `conf/` folder beside each one holds its Hydra config groups (`backbone/<name>.yaml`,
`prompts/<name>.yaml`), which the apps search after toprovar/conf/. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EXTRA_BACKBONES_ENV = "TOPROVAR_EXTRA_BACKBONES"


def extra_backbone_modules() -> list[str]:
    """The module names in $TOPROVAR_EXTRA_BACKBONES (empty when unset)."""
    return [name.strip() for name in os.environ.get(EXTRA_BACKBONES_ENV, "").split(",") if name.strip()]


def extra_conf_dirs() -> list[Path]:
    """The `conf/` folders beside those modules, found without importing them (one that cannot be
    found is left out here; the registry reports it when it imports the module)."""
    folders = []
    for name in extra_backbone_modules():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin is not None and (Path(spec.origin).parent / "conf").is_dir():
            folders.append(Path(spec.origin).parent / "conf")
    return folders


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds `extra_conf_dirs()` to the config search path (none without any)."""
    folders = extra_conf_dirs()
    return [f"hydra.searchpath=[{','.join(f'file://{folder}' for folder in folders)}]"] if folders else []

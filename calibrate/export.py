"""Write the selected policy as YAML with the record of how it was made, and check it loads."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from toprovar.errors import UserError

VERSIONED = ("toprovar", "torch", "optuna", "mlflow", "hydra-core", "numpy", "triton")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def portable_path(path: str | None) -> str | None:
    """A weight path as provenance stores it: files inside the installed `toprovar` package as
    package-relative `toprovar/...` (the same for every checkout or install), others as given.
    The hash beside it is the file's identity; the path only says where it was read from."""
    if path is None:
        return None
    import toprovar

    package = Path(toprovar.__file__).resolve().parent
    try:
        return (Path("toprovar") / Path(path).resolve().relative_to(package)).as_posix()
    except ValueError:
        return str(path)


def redact_url(url: str | None) -> str | None:
    """A storage/tracking URL without its password."""
    return None if url is None else re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def prompts_record(sets: Mapping[str, Any]) -> dict[str, Any]:
    """Prompt texts of each set (seeds run consecutively from `first_seed`) and a hash of all of it."""
    digest = hashlib.sha256(json.dumps({name: [s.texts, s.seeds] for name, s in sets.items()}).encode())
    return {
        "sha256": digest.hexdigest(),
        **{name: {"count": len(s), "first_seed": s.seeds[0], "texts": list(s.texts)} for name, s in sets.items()},
    }


def _plain(value: Any) -> Any:
    """YAML-safe plain data (tuples -> lists, numpy scalars -> floats)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_policy(policy: Mapping[str, Any], provenance: Mapping[str, Any], path: Path) -> Path:
    """policy.yaml: the policy's keys, then `provenance:`; returns the path."""
    document = {
        **_plain(policy),
        "provenance": _plain({**provenance, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# ToProVAR pruning policy for backbone '{policy.get('backbone', '?')}', written by "
        f"`python -m calibrate`. Load it with toprovar.load_policy(path).\n"
    )
    path.write_text(header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=110))
    return path


def check_loads(path: Path, backbone: str) -> Any:
    """Load the written file through the runtime's loader (the contract that matters)."""
    from toprovar.policy import load_policy

    return load_policy(path, backbone=backbone)


def copy_to(path: Path, folder: str | Path, name: str) -> Path:
    """Copy the exported policy into `folder` as `<name>.yaml` (e.g. toprovar/policies)."""
    target_dir = Path(folder)
    if target_dir.exists() and not target_dir.is_dir():
        raise UserError(f"export_to={folder} is a file; give a folder (e.g. export_to=toprovar/policies)")
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}.yaml"
    shutil.copyfile(path, target)
    return target

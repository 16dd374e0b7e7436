"""Renamed generation settings: the old names work for one more release (after 0.1.0), with a warning.

The guidance scale was `cfg` and the sampling temperature `tau`; `tau` also named the paper's ρ
threshold (a policy's `scale.tau`), which keeps its name. Whatever reads generation settings —
`pipeline.generate`'s keywords, the backbone group and the generate / compare configs, the command
lines of `python -m toprovar`, `python -m calibrate` and the tiny trainer — maps the old names here,
so removing them next release is this module and its few callers' lines.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from toprovar.errors import UserError

RENAMED = {"cfg": "guidance_scale", "tau": "temperature"}  # old name -> new name


def deprecation(old: str, new: str) -> str:
    return f"`{old}` is deprecated, use `{new}` (the old name goes in the next release)"


def renamed_settings(
    values: Mapping[str, Any], where: str, warn: Callable[[str], None] | None = None, stacklevel: int = 2
) -> dict[str, Any]:
    """`values` with every old name under its new one; an old name set to None is dropped.

    Each old name in use is reported once through `warn` (default: a FutureWarning, `stacklevel`
    counted as `warnings.warn` does from the caller); an old and a new name both set is a UserError
    naming `where`.
    """
    out = dict(values)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        if out.get(new) is not None:
            raise UserError(f"{where}: both `{old}` (deprecated) and `{new}` are set; keep `{new}` only")
        message = f"{where}: {deprecation(old, new)}"
        if warn is None:
            warnings.warn(message, FutureWarning, stacklevel=stacklevel + 1)
        else:
            warn(message)
        out[new] = value
    return out


def override_renames(*scopes: str) -> dict[str, str]:
    """Old -> new command-line keys of the renamed settings under each scope ('' = top level)."""
    return {f"{scope}{old}": f"{scope}{new}" for scope in scopes for old, new in RENAMED.items()}


def renamed_overrides(overrides: list[str], renames: Mapping[str, str], prog: str) -> list[str]:
    """`key=value` overrides with old keys under their new names; one line on stderr per old key."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in renames:
            print(f"{prog}: warning: {deprecation(f'{key}=', f'{renames[key]}=')}", file=sys.stderr)
            override = f"{renames[key]}={value}"
        out.append(override)
    return out


def renamed_keywords(renamed: Mapping[str, Any], where: str, **settings: Any) -> dict[str, Any]:
    """A function's keywords under their current names (`renamed`: its `**kwargs`, `where`: its
    name as in `generate()`); old names warn at the function's caller, unknown ones are a TypeError."""
    unknown = sorted(set(renamed) - set(RENAMED))
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument '{unknown[0]}'")
    return renamed_settings({**settings, **renamed}, where, stacklevel=3)

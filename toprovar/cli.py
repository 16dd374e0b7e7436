"""What the command-line programs share: the config folder, the override check, the Hydra runner.

`python -m toprovar generate|compare`, `python -m calibrate` and `python -m toprovar.tiny.train` are
Hydra apps over the YAML in `CONF_DIR` (toprovar/conf/, shipped inside the package, so an installed
wheel runs from any folder; run folders stay relative to the folder one launches from). Each goes
through `run_hydra_app`: deprecated keys are renamed with a warning (toprovar.renames), the config
is composed and resolved once without running, so a bad override is one line on stderr and exit
status 2, then Hydra runs the app, where a `UserError` is one line and exit status 2 as well.
Config groups of backbones added from outside the package are searched too (toprovar.extras).
Importing this module does not import torch, which keeps the override check fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from toprovar.errors import UserError, exit_on_user_error
from toprovar.extras import searchpath_overrides
from toprovar.renames import renamed_overrides, renamed_settings
from toprovar.schemas import register_schemas

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Keywords of `toprovar.pipeline.generate` that configs set (the command's value, else the backbone group's).
GENERATION_KEYS = ("guidance_scale", "temperature", "pixels", "h_div_w", "top_k", "top_p", "kv_policy")
# Hydra's hints after a composition error: where it searched and its docs, not the mistake.
_HYDRA_HINTS = (" Config search path:", " See https://hydra.cc")


def _register_resolvers() -> None:
    """`${pid:}` in a run folder's name: two runs started in the same second get their own folders."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)


_register_resolvers()
register_schemas()  # the YAML's defaults lists name them: they must be stored before any composition


def fail(prog: str, message: str) -> NoReturn:
    """`prog: error: message` on stderr, exit status 2."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def extra_searchpath(prog: str) -> list[str]:
    """`toprovar.extras.searchpath_overrides()`; a module there that cannot be found ends the program
    with one line on stderr and exit status 2."""
    try:
        return searchpath_overrides()
    except UserError as err:
        fail(prog, str(err))


def check_overrides(prog: str, config_name: str, overrides: Sequence[str]) -> None:
    """Compose `CONF_DIR/<config_name>.yaml` with `overrides` and resolve it, without running anything:
    a bad override (unknown key, wrong type, broken syntax, an interpolation that does not resolve)
    ends the program with one line on stderr and exit status 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=config_name):
            cfg = compose(
                config_name=config_name, overrides=[*overrides, *extra_searchpath(prog)], return_hydra_config=True
            )
        with open_dict(cfg):  # resolve as the app will: `${hydra:runtime.output_dir}` is some run folder
            cfg.hydra.runtime.output_dir = str(Path.cwd())
            HydraConfig.instance().set_config(cfg)
            del cfg["hydra"]
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        for hint in _HYDRA_HINTS:
            message = message.split(hint)[0]
        fail(prog, f"bad override: {message}")
    except AssertionError:  # Hydra asserts on some malformed group overrides (e.g. `+@=x`) instead of raising
        fail(prog, f"bad override: Hydra cannot parse {' '.join(overrides)}")


def run_hydra_app(
    prog: str,
    config_name: str,
    app: Callable[[Any], None],
    argv: Sequence[str] | None = None,
    renames: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Run `app(cfg)` as the Hydra app of `CONF_DIR/<config_name>.yaml` with the command line `argv`
    (default: sys.argv[1:]). Override keys are mapped before anything else: `renames` (old -> new, a
    deprecated key, one warning line each; toprovar.renames) and `aliases` (short -> config key, no
    warning). Plain overrides are checked first (`check_overrides`); flags (--help, --cfg, -m ...) go
    straight to Hydra."""
    import hydra

    overrides = []
    for override in sys.argv[1:] if argv is None else argv:
        key, sep, value = override.partition("=")
        overrides.append(f"{aliases[key]}={value}" if sep and aliases and key in aliases else override)
    overrides = renamed_overrides(overrides, renames or {}, prog)
    searchpath = extra_searchpath(prog)  # before Hydra makes a run folder
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        fail(prog, f"{CONF_DIR / config_name}.yaml is missing: this toprovar install is incomplete; reinstall it")
    if not any(arg.startswith("-") for arg in overrides):
        check_overrides(prog, config_name, overrides)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def main(cfg: Any) -> None:
        with exit_on_user_error(prog):
            app(cfg)

    sys.argv = [sys.argv[0], *overrides, *searchpath]  # argv[0] stays the entry script (MLflow's source tag reads it)
    main()


def generation_settings(
    group: Mapping[str, Any], command: Mapping[str, Any] | None = None, prog: str | None = None
) -> dict[str, Any]:
    """The `toprovar.pipeline.generate` keywords a config sets: each of `GENERATION_KEYS` from the
    command's config `command`, else from the backbone group `group`; unset ones are left out. The old
    names `cfg` / `tau` (e.g. in a backbone group file of one's own) still work, each reported as
    `<prog>: warning: ...` on stderr (without `prog`: a FutureWarning)."""

    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    report = warn if prog is not None else None
    top = renamed_settings(command, f"{prog or 'command'} config", report) if command is not None else {}
    base = renamed_settings(group, "backbone config", report)
    settings = {}
    for key in GENERATION_KEYS:
        value = top.get(key) if top.get(key) is not None else base.get(key)
        if value is not None:
            settings[key] = value
    return settings


def prompts_and_seeds(prompts: Any, seeds: Any) -> tuple[list[str], list[int]]:
    """The `prompts=` and `seeds=` of a command as lists: one prompt (text, not empty) per image and
    one integer seed per prompt (None: 0, 1, 2, ...). UserError for anything else."""
    example = 'e.g. prompts=\'["a cat", "a dog"]\''
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompts must be a non-empty list of strings, {example}")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UserError(f"prompt {empty[0]} is empty; every prompt needs some text, {example}")
    if seeds is None:
        seeds = list(range(len(prompts)))
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, (list, tuple))
        or len(seeds) != len(prompts)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise UserError(f"give one integer seed per prompt: {len(prompts)} prompt(s), seeds={seeds}")
    return list(prompts), list(seeds)

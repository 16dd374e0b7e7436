"""`python -m calibrate [overrides]`: calibrate a pruning policy for one backbone (Hydra app).

Configs live in the repository's conf/ (calibrate.yaml and the groups backbone, prompts, search,
tracking, storage). Mistakes — a bad override, a missing weight file, an unreachable database —
are reported in one line on stderr with exit status 2; bugs keep their traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

from toprovar.renames import override_renames, renamed_overrides

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROG = "calibrate"


def check_overrides(overrides: list[str]) -> None:
    """Compose the config once without running: bad overrides become one-line errors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=PROG):
            compose(config_name="calibrate", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        for noise in (" Config search path:", " See https://hydra.cc"):  # Hydra's hints, not the mistake
            message = message.split(noise)[0]
        print(f"{PROG}: error: bad override: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    args = sys.argv[1:] = renamed_overrides(sys.argv[1:], override_renames("backbone."), PROG)
    if not CONF_DIR.is_dir():
        print(f"{PROG}: error: config folder {CONF_DIR} not found; run from a checkout installed with "
              f"`pip install -e .`", file=sys.stderr)
        raise SystemExit(2)
    # Flags (--help, --cfg, -m ...) go straight to Hydra; plain overrides are checked first.
    if not any(arg.startswith("-") for arg in args):
        check_overrides(args)
    from calibrate.hydra_app import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()

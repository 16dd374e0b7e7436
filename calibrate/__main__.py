"""`python -m calibrate [overrides]`: calibrate a pruning policy for one backbone (Hydra app).

Configs live in the package's toprovar/conf/ (calibrate.yaml and the groups backbone, prompts, search,
tracking, storage). Mistakes — a bad override, a missing weight file, an unreachable database —
are reported in one line on stderr with exit status 2 (toprovar.cli); bugs keep their traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import toprovar.openmp  # noqa: F401  (first: sets OpenMP's spin-wait before torch loads)
from toprovar.cli import run_hydra_app
from toprovar.renames import override_renames

PROG = "calibrate"


def calibrate(cfg: Any) -> None:
    """Type the composed config and run the calibration in the Hydra run folder; a run that fails on
    its arguments leaves no folder behind, and exit status 3 says the exported policy is not validated."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from calibrate.app import run_calibration
    from calibrate.config import parse_config
    from calibrate.context import RunPaths
    from calibrate.folders import discard_unused_run_dir

    hydra_cfg = HydraConfig.get()
    run_dir, launch_dir = Path(hydra_cfg.runtime.output_dir), Path(hydra.utils.get_original_cwd())
    with discard_unused_run_dir(run_dir, launch_dir):
        paths = RunPaths(run_dir, launch_dir, tuple(hydra_cfg.overrides.task))
        outcome = run_calibration(parse_config(cfg), paths)
    if outcome.policy is not None:
        print(f"policy: {outcome.policy}")
    if outcome.exit_status:  # 3: the exported policy is not validated (docs/calibration.md)
        raise SystemExit(outcome.exit_status)


def check_run_dir(argv: list[str]) -> None:
    """A `hydra.run.dir=` that cannot be a folder (under a file, on /proc) is one line and exit status
    2, before Hydra tries to make it (a traceback). An interpolated part (`${now:...}`) is left to Hydra:
    the folder above it is checked."""
    from calibrate.folders import check_writable_folder
    from toprovar.cli import fail
    from toprovar.errors import UserError

    for override in argv:
        key, sep, value = override.lstrip("+").partition("=")
        if key != "hydra.run.dir" or not sep or not value.strip():
            continue
        fixed = value.split("${", 1)[0]
        folder = Path(fixed) if "${" not in value or fixed.endswith("/") else Path(fixed).parent
        try:
            check_writable_folder(folder, "hydra.run.dir")
        except UserError as err:
            fail(PROG, str(err))


def main() -> None:
    from calibrate.config import register_schema

    register_schema()
    check_run_dir(sys.argv[1:])
    run_hydra_app(PROG, "calibrate", calibrate, renames=override_renames("backbone."))


if __name__ == "__main__":
    main()

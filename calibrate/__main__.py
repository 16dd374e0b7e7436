"""`python -m calibrate [overrides]`: calibrate a pruning policy for one backbone (Hydra app).

Configs live in the package's toprovar/conf/ (calibrate.yaml and the groups backbone, prompts, search,
tracking, storage). Mistakes — a bad override, a missing weight file, an unreachable database —
are reported in one line on stderr with exit status 2 (toprovar.cli); bugs keep their traceback.
"""

from __future__ import annotations

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

    from calibrate.app import Calibration, discard_unused_run_dir
    from calibrate.config import parse_config

    hydra_cfg = HydraConfig.get()
    run_dir, launch_dir = Path(hydra_cfg.runtime.output_dir), Path(hydra.utils.get_original_cwd())
    with discard_unused_run_dir(run_dir, launch_dir):
        calibration = Calibration(parse_config(cfg), run_dir, launch_dir, list(hydra_cfg.overrides.task))
        path = calibration.run()
    if path is not None:
        print(f"policy: {path}")
    if calibration.exit_status:  # 3: the exported policy is not validated (docs/calibration.md)
        raise SystemExit(calibration.exit_status)


def main() -> None:
    run_hydra_app(PROG, "calibrate", calibrate, renames=override_renames("backbone."))


if __name__ == "__main__":
    main()

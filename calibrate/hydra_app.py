"""The Hydra entry point: compose conf/calibrate.yaml, type it, run the calibration."""
from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from toprovar.errors import exit_on_user_error


# An absolute path: `python -m calibrate` runs the package as a module, where Hydra would read a
# relative path as a Python package name.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# `${pid:}` in the run folder's name: two calibrations started in the same second get their own folders.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)


@hydra.main(config_path=str(CONF_DIR), config_name="calibrate", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    from calibrate.app import Calibration, discard_unused_run_dir
    from calibrate.config import parse_config

    hydra_cfg = HydraConfig.get()
    run_dir, launch_dir = Path(hydra_cfg.runtime.output_dir), Path(hydra.utils.get_original_cwd())
    with exit_on_user_error("calibrate"), discard_unused_run_dir(run_dir, launch_dir):
        calibration = Calibration(parse_config(cfg), run_dir, launch_dir, list(hydra_cfg.overrides.task))
        path = calibration.run()
        if path is not None:
            print(f"policy: {path}")
    if calibration.exit_status:  # 3: the exported policy is not validated (docs/calibration.md)
        raise SystemExit(calibration.exit_status)

"""The Hydra entry point: compose conf/calibrate.yaml, type it, run the calibration."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from toprovar.errors import exit_on_user_error


# An absolute path: `python -m calibrate` runs the package as a module, where Hydra would read a
# relative path as a Python package name.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path=str(CONF_DIR), config_name="calibrate", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    from calibrate.app import Calibration
    from calibrate.config import parse_config

    with exit_on_user_error("calibrate"):
        hydra_cfg = HydraConfig.get()
        calibration = Calibration(parse_config(cfg), Path(hydra_cfg.runtime.output_dir),
                                  Path(hydra.utils.get_original_cwd()), list(hydra_cfg.overrides.task))
        path = calibration.run()
        if path is not None:
            print(f"policy: {path}")

"""Shared fixtures: the small random-weight test backbones (no files needed; registered by
tests/backbones.py, for this process and the subprocesses it starts) and the Hydra configs of
toprovar/conf/ composed as the apps compose them (the YAML is the one source of default values)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from tests.backbones import use_test_backbones
from toprovar.cli import CONF_DIR
from toprovar.extras import searchpath_overrides
from toprovar.models.registry import build_backbone

use_test_backbones()


@pytest.fixture(scope="module")
def small():
    return build_backbone("test-small", device="cpu")


@pytest.fixture(scope="module")
def patchify():
    return build_backbone("test-small-patchify", device="cpu")


def compose(app: str, overrides: Sequence[str], run_dir: Path) -> DictConfig:
    """toprovar/conf/<app>.yaml composed with command-line `overrides`, as the app's `@hydra.main` hands it
    over: without the `hydra` node, and with `${hydra:runtime.output_dir}` resolving to `run_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=app):
        cfg = hydra_compose(config_name=app, overrides=[*overrides, *searchpath_overrides()], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def calibrate_config(tmp_path_factory):
    """`calibrate_config(*overrides)`: the typed config `python -m calibrate *overrides` would run with."""
    from calibrate.config import parse_config

    run_dir = tmp_path_factory.mktemp("calibrate-run")
    return lambda *overrides: parse_config(compose("calibrate", overrides, run_dir))

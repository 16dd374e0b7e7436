"""Backbones from outside the package (toprovar.extras): the test backbones are known only where
$TOPROVAR_EXTRA_BACKBONES names tests.backbones, and a module it names that is missing is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.backbones import REPO
from toprovar.extras import EXTRA_BACKBONES_ENV, extra_conf_dirs


def _generate(tmp_path: Path, extra: str | None, *overrides: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != EXTRA_BACKBONES_ENV}
    if extra is not None:
        env[EXTRA_BACKBONES_ENV] = extra
    return subprocess.run(
        [sys.executable, "-m", "toprovar", "generate", "prompts=a", "device=cpu", *overrides],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # a hang guard, not a speed claim


def test_conftest_adds_the_test_config_groups() -> None:
    assert extra_conf_dirs() == [REPO / "tests" / "conf"]
    assert (REPO / "tests" / "conf" / "backbone" / "test-small.yaml").is_file()


def test_the_package_alone_does_not_know_the_test_backbones(tmp_path: Path) -> None:
    result = _generate(tmp_path, None, "backbone=test-small")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Could not find 'backbone/test-small'" in result.stderr
    assert "infinity-2b" in result.stderr  # the options it does know
    assert not list(tmp_path.iterdir())  # no run folder
    probe = "from toprovar.models.registry import backbone_names; print(' '.join(backbone_names()))"
    names = subprocess.run(
        [sys.executable, "-c", probe],
        env={k: v for k, v in os.environ.items() if k != EXTRA_BACKBONES_ENV},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    assert "infinity-2b" in names and not [name for name in names if name.startswith("test-")]


def test_a_missing_extra_module_is_one_line_before_any_run_folder(tmp_path: Path) -> None:
    result = _generate(tmp_path, "tests.no_such_module", "backbone=tiny")
    assert result.returncode == 2
    assert result.stderr == (
        f"toprovar generate: error: {EXTRA_BACKBONES_ENV} names module 'tests.no_such_module', "
        "which cannot be imported (is it on PYTHONPATH?)\n"
    )
    assert not list(tmp_path.iterdir())


def test_the_extra_module_registers_and_configures_test_small(tmp_path: Path) -> None:
    result = _generate(tmp_path, "tests.backbones", "backbone=test-small", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "run").glob("*.png"))) == 1

"""Commands the tests run in a child process: `run_module` (`python -m ...`, as a user types it)
and `run_interpreter_check` (a check script of tests/ under the Triton interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m module *args` from `cwd`, stdout and stderr captured as text. env: the child's
    whole environment (None: this one with `HYDRA_FULL_ERROR=0`, so a command's mistakes are its
    one-line errors); timeout: a hang guard, not a speed claim."""
    if env is None:
        env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_interpreter_check(script: str) -> subprocess.CompletedProcess:
    """tests/<script> in a child process with `TRITON_INTERPRET=1` (it must be set before triton is
    imported, hence the child) and a random seed as its argument; output captured as text."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    seed = str(int(torch.randint(0, 2**31 - 1, ()).item()))
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / script), seed], env=env, capture_output=True, text=True, timeout=600
    )

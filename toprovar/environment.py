"""What machine and software ran a measurement. A time holds only on the device that measured it, so
every benchmark's result and a calibrated policy's provenance carry this record beside their numbers."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; `platform.processor()` is often empty there),
    else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device (the current one for None when CUDA is there), else the CPU's."""
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def versions() -> dict[str, str | None]:
    """torch, triton (None where it is not installed), CUDA (None on a CPU build) and Python."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def run_record(
    prog: str, argv: Sequence[str] | None = None, device: torch.device | str | None = None
) -> dict[str, Any]:
    """The command (`prog` and its arguments, `sys.argv[1:]` for None), when (UTC), the device and
    the software that ran it, and the CPU threads torch used: the header of a benchmark's result."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": shlex.join([*prog.split(), *args]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        **versions(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }

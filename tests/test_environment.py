"""The record of what ran a measurement (toprovar.environment): benchmark headers and provenance."""

from __future__ import annotations

import datetime as dt
import os
import shlex

import torch

from toprovar.environment import cpu_name, device_name, run_record, versions


def test_run_record_names_the_command_as_a_shell_would_repeat_it():
    record = run_record("python -m benchmarks.x", ["--out", "a folder/r.json", "k=v"], device="cpu")
    assert shlex.split(record["command"]) == ["python", "-m", "benchmarks.x", "--out", "a folder/r.json", "k=v"]
    stamped = dt.datetime.strptime(record["date"], "%Y-%m-%d %H:%M UTC").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - stamped).total_seconds()) < 120
    assert record["device"] == cpu_name() != "" and record["threads"] == torch.get_num_threads()
    assert record["cpus"] == os.cpu_count() and record["torch"] == torch.__version__
    assert {"triton", "cuda", "python"} <= set(record) and record["cuda"] == torch.version.cuda


def test_device_name_is_the_gpu_for_cuda_and_the_cpu_model_otherwise():
    assert device_name(torch.device("cpu")) == device_name("cpu") == cpu_name()
    if torch.cuda.is_available():
        assert device_name("cuda") == torch.cuda.get_device_name(0) == device_name()
    else:
        assert device_name() == cpu_name()
    assert versions()["torch"] == torch.__version__

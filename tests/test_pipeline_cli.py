"""`python -m toprovar generate`: PNGs from the command line, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.commands import run_module
from toprovar.__main__ import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("toprovar", "generate", *args)


def test_generate_writes_pngs(tmp_path: Path) -> None:
    out = tmp_path / "pngs"
    proc = _cli(
        "backbone=test-small",
        'prompts=["a red cube", "two blue balls"]',
        "seeds=[5, 9]",
        f"out_dir={out}",
        "batch_size=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000_seed5.png", "001_seed9.png"]
    assert Image.open(pngs[0]).size == (64, 64) and Image.open(pngs[0]).mode == "RGB"
    assert (out / "trace.csv").read_text().splitlines()[0].startswith("scale,h,w,tokens,time_ms")


def test_missing_weights_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "infinity_2b_reg.pth"
    proc = _cli(
        "backbone=infinity-2b",
        f"backbone.weights.transformer={missing}",
        f"out_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("toprovar generate: error:") and str(missing) in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, match", [("foo=1", "bad override"), ("backbone=nope", "backbone/nope")])
def test_bad_override_is_one_line_exit_2(override: str, match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", override])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err


def test_unknown_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["paint"])
    assert info.value.code == 2 and "usage" in capsys.readouterr().err


def test_generate_in_equal_padded_chunks_writes_each_prompt_once(tmp_path: Path) -> None:
    """3 prompts at batch_size=2 run as two calls of 2 (the last padded with a copy): three PNGs, the
    same as one prompt a call, and one trace per call."""
    import numpy as np

    prompts = 'prompts=["a red cube", "two blue balls", "a green cone"]'
    runs = {}
    for batch in ("1", "2"):
        out = tmp_path / f"batch{batch}"
        proc = _cli("backbone=test-small", prompts, f"out_dir={out}", f"batch_size={batch}", f"hydra.run.dir={out}/run")
        assert proc.returncode == 0, proc.stderr
        runs[batch] = out
    pngs = sorted(p.name for p in runs["2"].glob("*.png"))
    assert pngs == ["000_seed0.png", "001_seed1.png", "002_seed2.png"]
    for name in pngs:
        assert np.array_equal(np.asarray(Image.open(runs["1"] / name)), np.asarray(Image.open(runs["2"] / name)))
    import pandas as pd

    assert sorted(pd.read_csv(runs["2"] / "trace.csv").batch.unique()) == [0, 1]
    assert (runs["2"] / "prompts.txt").read_text().splitlines()[2] == "002_seed2.png\ta green cone"

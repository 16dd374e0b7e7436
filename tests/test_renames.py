"""The guidance scale is `guidance_scale` and the sampling temperature `temperature` everywhere; the
old names `cfg` / `tau` still work for one release, each use reported with the new name."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.commands import run_module
from toprovar.cli import GENERATION_KEYS, check_overrides, generation_settings
from toprovar.errors import UserError
from toprovar.pipeline import generate
from toprovar.renames import RENAMED, override_renames, renamed_overrides, renamed_settings


def _seed() -> int:
    return random.randrange(2**31 - 1)


# -- pipeline.generate's keywords -----------------------------------------------------------------


def test_generate_old_keywords_give_the_same_bits_with_a_warning(small) -> None:
    seeds = [_seed(), _seed()]
    guidance, temperature = random.choice([1.0, 2.0, 4.0]), random.choice([0.5, 0.8])
    new = generate(small, ["a red cube", "a dog"], seeds, guidance_scale=guidance, temperature=temperature)
    with pytest.warns(FutureWarning) as record:
        old = generate(small, ["a red cube", "a dog"], seeds, cfg=guidance, tau=temperature)
    messages = [str(w.message) for w in record]
    assert any("`cfg` is deprecated, use `guidance_scale`" in m for m in messages)
    assert any("`tau` is deprecated, use `temperature`" in m for m in messages)
    assert all(Path(w.filename).name == Path(__file__).name for w in record if w.category is FutureWarning)
    assert all(torch.equal(a, b) for a, b in zip(new.bits, old.bits)) and torch.equal(new.images, old.images)
    # The names matter: a different guidance scale gives other bits.
    other = generate(small, ["a red cube", "a dog"], seeds, guidance_scale=guidance + 1.5, temperature=temperature)
    assert any(not torch.equal(a, b) for a, b in zip(new.bits, other.bits))


def test_generate_old_and_new_keyword_together_or_unknown_keyword(small) -> None:
    with pytest.raises(UserError, match="both `cfg` .* and `guidance_scale`"):
        generate(small, ["a"], [1], cfg=2.0, guidance_scale=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance'"):
        generate(small, ["a"], [1], guidance=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # new names: no warning at all
        generate(small, ["a"], [1], guidance_scale=2.0, temperature=0.9)


def test_backbone_spec_uses_the_new_names(small) -> None:
    from toprovar.models.registry import get_backbone

    for name in ("infinity-2b", "infinity-8b", "tiny", "test-small"):
        spec = get_backbone(name)
        assert spec.guidance_scale == 3.0 and 0 < spec.temperature <= 1
        assert not hasattr(spec, "cfg") and not hasattr(spec, "tau")
    assert get_backbone("infinity-2b").temperature == 0.5  # official 2B notebook


# -- settings mapping -----------------------------------------------------------------------------


def test_renamed_settings_maps_warns_and_refuses_both() -> None:
    seen: list[str] = []
    out = renamed_settings({"cfg": 4, "tau": None, "pixels": "1M", "temperature": 0.7}, "here", seen.append)
    assert out == {"guidance_scale": 4, "temperature": 0.7, "pixels": "1M"}  # tau None: dropped, no warning
    assert seen == ["here: `cfg` is deprecated, use `guidance_scale` (the old name goes in the next release)"]
    with pytest.raises(UserError, match="here: both `tau` .* `temperature`"):
        renamed_settings({"tau": 0.5, "temperature": 0.7}, "here", seen.append)
    assert renamed_settings({"guidance_scale": None}, "here", seen.append) == {"guidance_scale": None}
    assert len(seen) == 1


def test_overrides_are_renamed_with_one_line_each(capsys: pytest.CaptureFixture) -> None:
    renames = override_renames("", "backbone.")
    assert set(renames) == {"cfg", "tau", "backbone.cfg", "backbone.tau"}
    args = ["cfg=4", "backbone.tau=0.5", "search.space.tau=[0.3,0.5]", "--cfg", "job", "tau", "pixels=1M"]
    out = renamed_overrides(args, renames, "prog")
    assert out == [
        "guidance_scale=4",
        "backbone.temperature=0.5",
        "search.space.tau=[0.3,0.5]",
        "--cfg",
        "job",
        "tau",
        "pixels=1M",
    ]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "prog: warning: `cfg=` is deprecated, use `guidance_scale=` (the old name goes in the next release)",
        "prog: warning: `backbone.tau=` is deprecated, use `backbone.temperature=` "
        "(the old name goes in the next release)",
    ]


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_generate_and_compare_configs_take_new_and_old_keys(command: str, capsys: pytest.CaptureFixture) -> None:
    check_overrides(
        command,
        command,
        ["guidance_scale=[1,2,3]", "temperature=0.5", "backbone.guidance_scale=2", "backbone.temperature=0.9"],
    )
    for old in ("cfg=2", "tau=0.5", "backbone.cfg=2", "backbone.tau=0.5"):
        with pytest.raises(SystemExit):  # the old keys are gone from the configs ...
            check_overrides(command, command, [old])
        # ... and the command line maps them before composing
        check_overrides(command, command, renamed_overrides([old], override_renames("", "backbone."), "prog"))
    capsys.readouterr()


def test_generation_settings_prefers_the_command_then_the_group(capsys: pytest.CaptureFixture) -> None:
    group = {"name": "tiny", "weights": {}, "guidance_scale": None, "temperature": 0.8, "pixels": None}
    cfg = {"backbone": group, "guidance_scale": 2.0, "temperature": None, "top_p": 0.9, "kv_policy": None}
    assert generation_settings(group, cfg, "prog") == {"guidance_scale": 2.0, "temperature": 0.8, "top_p": 0.9}
    assert capsys.readouterr().err == ""
    own_group = {"name": "tiny", "cfg": 4.0, "tau": 0.5}  # a backbone group file written before the rename
    assert generation_settings(own_group, cfg, "prog") == {"guidance_scale": 2.0, "temperature": 0.5, "top_p": 0.9}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("prog: warning: backbone config: `") for line in err)


def test_calibration_backend_maps_old_group_keys() -> None:
    from calibrate.backend import load_backend

    assert not set(RENAMED) & set(GENERATION_KEYS) and set(RENAMED.values()) <= set(GENERATION_KEYS)
    backend = load_backend(
        {"name": "test-small", "guidance_scale": 2.0, "temperature": None}, torch.device("cpu"), None, 2
    )
    assert backend.settings == {"guidance_scale": 2.0}
    with pytest.warns(FutureWarning, match="backbone config: `tau` is deprecated, use `temperature`"):
        backend = load_backend({"name": "test-small", "tau": 0.5}, torch.device("cpu"), None, 2)
    assert backend.settings == {"temperature": 0.5}


def test_calibrate_command_line_maps_backbone_keys(capsys: pytest.CaptureFixture) -> None:
    check_overrides(
        "calibrate",
        "calibrate",
        ["backbone.guidance_scale=2", "backbone.temperature=0.5", "search.space.tau=[0.3,0.5]"],
    )
    check_overrides(
        "calibrate",
        "calibrate",
        renamed_overrides(["backbone.cfg=2", "backbone.tau=0.5"], override_renames("backbone."), "x"),
    )
    assert "backbone.temperature=" in capsys.readouterr().err


def test_bench_pruning_guidance_scale_flag(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.pruning import parse

    assert parse(["--smoke"]).guidance_scale == 3.0
    assert parse(["--smoke", "--guidance-scale", "2.5"]).guidance_scale == 2.5
    assert capsys.readouterr().err == ""
    assert parse(["--smoke", "--cfg", "1.5"]).guidance_scale == 1.5
    assert "`--cfg` is deprecated, use `--guidance-scale`" in capsys.readouterr().err


def test_tiny_eval_config_uses_guidance_scales(tmp_path: Path) -> None:
    from tests.conftest import compose
    from toprovar.tiny.train import parse_config

    assert parse_config(compose("train_tiny", [], tmp_path)).eval.guidance_scales == [2.0, 3.0, 4.0]
    assert parse_config(compose("train_tiny", ["eval.guidance_scales=[3.0]"], tmp_path)).eval.guidance_scales == [3.0]
    check_overrides("toprovar.tiny.train", "train_tiny", ["eval.guidance_scales=[3.0]"])


# -- the command line, end to end -------------------------------------------------------------------


def test_generate_command_with_old_keys_matches_new_keys(small, tmp_path: Path) -> None:
    seed = _seed()
    proc = run_module(
        "toprovar",
        "generate",
        "backbone=test-small",
        "cfg=1",
        "backbone.tau=0.5",
        'prompts=["a red cube"]',
        f"seeds=[{seed}]",
        f"out_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "deprecated" in line]
    assert warned == [
        "toprovar generate: warning: `cfg=` is deprecated, use `guidance_scale=` "
        "(the old name goes in the next release)",
        "toprovar generate: warning: `backbone.tau=` is deprecated, use `backbone.temperature=` "
        "(the old name goes in the next release)",
    ]
    image = np.asarray(Image.open(tmp_path / f"000_seed{seed}.png"))
    expected = generate(small, ["a red cube"], [seed], guidance_scale=1.0, temperature=0.5).images[0].numpy()
    assert np.array_equal(image, expected)
    assert not np.array_equal(image, generate(small, ["a red cube"], [seed]).images[0].numpy())

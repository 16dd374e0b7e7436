"""toprovar.cli, what every command line shares: the config folder, the pre-run override check,
the checks of prompts, seeds, policy, device and dtype before any weights load (one line, exit 2)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from toprovar.__main__ import main
from toprovar.cli import CONF_DIR, GENERATION_KEYS, check_overrides, prompts_and_seeds
from toprovar.errors import UserError

# (program, config) of every Hydra app, and an integer key of its config
APPS = [
    ("toprovar generate", "generate"),
    ("toprovar compare", "compare"),
    ("calibrate", "calibrate"),
    ("toprovar.tiny.train", "train_tiny"),
]
INT_KEY = {"generate": "batch_size", "compare": "batch_size", "calibrate": "batch_size", "train_tiny": "seed"}


def test_the_config_folder_is_in_the_package() -> None:
    import toprovar

    assert CONF_DIR == Path(toprovar.__file__).resolve().parent / "conf"
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(config for _, config in APPS)


def test_generation_keys_are_the_generate_keywords() -> None:
    """Every generation key is a keyword of `pipeline.generate` and a key of the command configs."""
    import inspect

    import yaml

    from toprovar.pipeline import generate

    assert set(GENERATION_KEYS) <= set(inspect.signature(generate).parameters)
    for config in ("generate", "compare"):
        assert set(GENERATION_KEYS) <= set(yaml.safe_load((CONF_DIR / f"{config}.yaml").read_text()))


@pytest.mark.parametrize("prog, config", APPS)
@pytest.mark.parametrize("override", ["+@=.nan", "{key}=${{missing.key}}", "{key}=[1,", "no_such_key=1"])
def test_bad_override_is_one_line_exit_2(prog: str, config: str, override: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        check_overrides(prog, config, [override.format(key=INT_KEY[config])])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: bad override")


@pytest.mark.parametrize("prog, config", APPS)
def test_good_overrides_compose_silently(prog: str, config: str, capsys: pytest.CaptureFixture) -> None:
    check_overrides(prog, config, [f"{INT_KEY[config]}={random.randrange(1, 1000)}", "device=cpu"])
    assert capsys.readouterr().err == ""


def test_prompts_and_seeds() -> None:
    assert prompts_and_seeds("a cat", None) == (["a cat"], [0])
    assert prompts_and_seeds(["a", "b"], [7, 3]) == (["a", "b"], [7, 3])
    assert prompts_and_seeds(["a"], 5) == (["a"], [5])
    for prompts, seeds, match in [
        ([""], None, "prompt 0 is empty"),
        (["a", "  "], None, "prompt 1 is empty"),
        ([], None, "non-empty list"),
        ([3], None, "non-empty list"),
        ("a", [1, 2], "one integer seed per prompt"),
        (["a"], [1.5], "integer seed"),
        (["a"], [True], "integer seed"),
        (["a"], "x", "integer seed"),
    ]:
        with pytest.raises(UserError, match=match):
            prompts_and_seeds(prompts, seeds)


# Mistakes found before any weights load: infinity-2b's default weight paths do not exist here, so a
# run that got as far as loading would say "weights not found" instead of the expected message.
@pytest.mark.parametrize(
    "command, override, message",
    [  # override: space-separated overrides
        ("generate", 'prompts=[""]', "prompt 0 is empty"),
        ("generate", "seeds=[1,2]", "one integer seed per prompt"),
        ("generate", "policy=tiny", "made for backbone 'tiny'"),
        ("generate", "policy=/no/such/policy.yaml", "policy"),
        ("generate", "dtype=float64", "dtype='float64'"),
        ("generate", "device=tpu", "device='tpu'"),
        (
            "generate",
            "policy=fastvar-infinity-2b pixels=0.06M",
            "fastvar.ratios: got key 9, expected scale indices in [0, 6]",
        ),
        # the shipped tiny policy's D floor lies past 2B's 7 scales at 0.06M (checked in test_policy)
        ("generate", "policy=tiny allow_other_backbone=true pixels=0.06M", "scale.min_scale: got "),
        ("compare", 'prompts=["a",""]', "prompt 1 is empty"),
        ("compare", "methods=[tiny]", "made for backbone 'tiny'"),
        ("compare", "dtype=int8", "dtype='int8'"),
        ("compare", "methods=[fastvar] pixels=0.06M", "methods: fastvar: policy fastvar-infinity-2b: fastvar.ratios"),
    ],
)
def test_mistakes_are_one_line_before_weights_load(
    command: str, override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert not Path("weights/infinity_2b_reg.pth").exists()
    with pytest.raises(SystemExit) as stop:
        main(
            [
                command,
                "backbone=infinity-2b",
                *override.split(" "),
                f"out_dir={tmp_path}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith(f"toprovar {command}: error: ") and message in err[-1], err
    assert "checkpoint not found" not in "\n".join(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without one")
def test_cuda_on_a_cpu_machine_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "generate",
                "backbone=infinity-2b",
                "device=cuda",
                f"out_dir={tmp_path}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    assert stop.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err

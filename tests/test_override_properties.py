"""Issue 15 item 2, overrides: any command-line override either composes or is one error line, exit 2.

Each CLI checks its overrides by composing its config before anything runs (`toprovar.cli.check_overrides`);
whatever the overrides (tests/strategies.py: known and made-up keys, +/++/~ forms, NaN, huge
numbers, broken brackets, interpolations, junk), that check returns or exits with status 2 and
one `<prog>: error: ...` line on stderr, never a traceback. What the composed values then mean
(a policy path, a device) is checked by each command before weights load (toprovar.policy).
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import config_keys, override_strings, override_values, property_settings
from toprovar.cli import CONF_DIR, check_overrides

# program as it prints itself -> (config name, check function taking the override list)
CLIS = {
    prog: (config, lambda overrides, prog=prog, config=config: check_overrides(prog, config, overrides))
    for prog, config in (
        ("toprovar generate", "generate"),
        ("toprovar compare", "compare"),
        ("calibrate", "calibrate"),
        ("toprovar.tiny.train", "train_tiny"),
    )
}


def _conf_dir():
    return CONF_DIR


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_override_checks_compose_or_fail_in_one_line(prog: str) -> None:
    config, check = CLIS[prog]
    keys = config_keys(_conf_dir(), config)

    @property_settings(ci_examples=25)
    @given(st.lists(override_strings(keys), min_size=1, max_size=3))
    def check_one(overrides: list[str]) -> None:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                check(overrides)
            except SystemExit as stop:
                assert stop.code == 2, (overrides, stop.code)
                lines = stderr.getvalue().splitlines()
                assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (overrides, lines)
                return
        assert stderr.getvalue() == "", overrides  # composed: nothing said

    check_one()


def test_known_bad_overrides_are_refused() -> None:
    """The strategy's error branch is reached: a made-up key and a broken list are refused (not composed)."""
    for prog, (_, check) in CLIS.items():
        for overrides in (["no_such_key=1"], ["seed=[1,"]):
            with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit) as stop:
                check(overrides)
            assert stop.value.code == 2 and stderr.getvalue().startswith(f"{prog}: error: bad override")


@property_settings(ci_examples=40)
@given(override_values)
def test_any_policy_override_value_loads_or_fails_in_one_line(value: str) -> None:
    """`policy=<anything>` that composes reaches `load_policy` as a Policy or one UserError line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from toprovar.errors import UserError
    from toprovar.policy import Policy, load_policy

    try:
        with initialize_config_dir(config_dir=str(_conf_dir()), version_base=None, job_name="generate"):
            given_value = OmegaConf.to_container(compose("generate", overrides=[f"policy={value}"]), resolve=True)[
                "policy"
            ]
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # refused while composing: test_override_checks_compose_or_fail_in_one_line covers it
    try:
        assert isinstance(load_policy(given_value), Policy)
    except UserError as err:
        assert "\n" not in str(err) and len(str(err)) < 500, str(err)


# Two holes the property test above found in explore mode, fixed in toprovar.cli.check_overrides:
# Hydra asserting on a '+@=...' group override, and interpolations left unresolved by the check.
@pytest.mark.parametrize("prog", sorted(CLIS))
def test_package_only_group_override_is_one_line(prog: str) -> None:
    with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit) as stop:
        CLIS[prog][1](["+@=.nan"])
    assert stop.value.code == 2 and len(stderr.getvalue().splitlines()) == 1


def test_unresolvable_interpolation_is_refused_by_the_check() -> None:
    with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit) as stop:
        CLIS["toprovar generate"][1](["out_dir=${missing.key}"])
    assert stop.value.code == 2 and stderr.getvalue().startswith("toprovar generate: error: bad override")

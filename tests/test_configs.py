"""Every Hydra app config of toprovar/conf/, with every option of every config group it uses, composes
through Hydra and passes the app's own validation (lightning-hydra-template's config test): a
broken option fails here, not in a user's hands. The YAML is the only source of default values,
so what composes here is exactly what the apps run with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose
from toprovar.errors import UserError

APPS = sorted(path.stem for path in CONF_DIR.glob("*.yaml"))


def _groups(app: str) -> list[str]:
    """The config groups in the defaults list of toprovar/conf/<app>.yaml."""
    defaults = yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text()).get("defaults", [])
    return [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


CASES = [(app, None, None) for app in APPS] + [
    (app, group, option) for app in APPS for group in _groups(app) for option in _options(group)
]


def _check_backbone(group: dict) -> None:
    """What the model registry checks before loading: a registered name and known weight entries."""
    from toprovar.models.registry import get_backbone

    get_backbone(group["name"]).weights.merged(group.get("weights"))


def _check_calibrate(cfg, run_dir: Path) -> None:
    from calibrate.config import parse_config
    from calibrate.prompts import load_prompt_sets
    from calibrate.search import open_study

    parsed = parse_config(cfg)
    _check_backbone(parsed.backbone)
    sets = load_prompt_sets(parsed.prompts)  # enough prompts for the three disjoint sets, files exist
    assert (len(sets.presample), len(sets.search), len(sets.validate)) == (
        parsed.prompts.presample,
        parsed.prompts.search,
        parsed.prompts.validate,
    )
    if parsed.storage.url is not None:
        assert str(run_dir) in parsed.storage.url  # the study lives in the Hydra run folder
    open_study("config-test", parsed.storage, parsed.search.sampler, 0, parsed.search.n_trials)


def _check_train_tiny(cfg, run_dir: Path) -> None:
    from toprovar.tiny.train import parse_config

    parse_config(cfg)


def _check_plain(cfg, run_dir: Path) -> None:
    """generate / compare read the config as a plain dict: it must resolve, and name a real backbone."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    _check_backbone(plain["backbone"])


CHECKS = {
    "calibrate": _check_calibrate,
    "train_tiny": _check_train_tiny,
    "generate": _check_plain,
    "compare": _check_plain,
}


def test_every_app_has_a_check_and_every_group_an_option():
    assert set(CHECKS) == set(APPS)
    assert all(_options(group) for app in APPS for group in _groups(app))


@pytest.mark.parametrize(
    "app, group, option", CASES, ids=[f"{a}" if g is None else f"{a}-{g}={o}" for a, g, o in CASES]
)
def test_config_option_composes_and_validates(app, group, option, tmp_path):
    overrides = [] if group is None else [f"{group}={option}"]
    cfg = compose(app, overrides, tmp_path)
    if group is not None:  # the option is the one in use (prompts follows the backbone by default)
        assert OmegaConf.select(cfg, group) is not None
    CHECKS[app](cfg, tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.space.alpha_span=[0.5,1.2]", "search.space.alpha_span=[0.5, 1.2] must be [low, high]"),
        ("search.space.beta=[0.0,1.0]", "search.space.beta"),  # log scale: above 0
        ("search.space.beta=null", "search.space.beta"),  # only measured knobs may be null
        ("search.space.protect_layers=[1.5,2]", "integers"),
        ("search.space.restore=[cached,bogus]", "search.space.restore"),
        ("~search.space.order", "search.space.order has no range"),
        ("+search.space.gamma=[0,1]", "search.space.gamma is not a searched knob"),
        ("search.sampler=grid", "tpe, nsga2, gp, random"),
        ("~search.n_trials", "search.n_trials has no value"),
        ("~search.latency.warmup", "search.latency.warmup has no value"),
    ],
)
def test_bad_calibrate_values_are_one_line_errors(override, message, tmp_path):
    from calibrate.config import parse_config

    with pytest.raises(UserError) as caught:
        parse_config(compose("calibrate", ["backbone=test-small", override], tmp_path))
    assert message in str(caught.value) and "\n" not in str(caught.value)

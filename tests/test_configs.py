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
from toprovar.extras import extra_conf_dirs

APPS = sorted(path.stem for path in CONF_DIR.glob("*.yaml"))


def _groups(app: str) -> list[str]:
    """The config groups in the defaults list of toprovar/conf/<app>.yaml."""
    defaults = yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text()).get("defaults", [])
    return [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]


# The package's groups and those of the test backbones (tests/conf/, searched as the apps search it).
CONF_DIRS = [CONF_DIR, *extra_conf_dirs()]


def _options(group: str) -> list[str]:
    return sorted(path.stem for folder in CONF_DIRS for path in (folder / group).glob("*.yaml"))


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
        ("batch_size=0", "batch_size=0; give a positive integer or auto"),
        ("backbone.calibration_batch=-2", "batch_size=-2; give a positive integer or auto"),
    ],
)
def test_bad_calibrate_values_are_one_line_errors(override, message, tmp_path):
    from calibrate.config import parse_config

    with pytest.raises(UserError) as caught:
        parse_config(compose("calibrate", ["backbone=test-small", override], tmp_path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- one schema per command, the YAML its only source of defaults ---------------------------------------


def _calibrate_schema() -> type | None:
    """calibrate's schema, registered with Hydra's ConfigStore by `calibrate.config.register_schema`."""
    from calibrate.config import CalibrationConfig, register_schema

    register_schema()
    return CalibrationConfig


def _schemas() -> dict[str, type]:
    from toprovar.schemas import SCHEMAS

    schemas = dict(SCHEMAS)
    if _calibrate_schema() is not None:
        schemas["calibrate"] = _calibrate_schema()
    return schemas


def _yaml_keys(app: str) -> set[str]:
    """The keys toprovar/conf/<app>.yaml sets itself, plus the groups of its defaults list."""
    raw = yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text())
    return (set(raw) - {"defaults", "hydra"}) | set(_groups(app))


def _assert_schema_matches(schema: type, node, where: str) -> None:
    """Every field of `schema` has no default and a value in `node` of its type; `node` has no other
    key; nested dataclasses recursively."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert set(node.keys()) == set(fields), where
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, (
            f"{key} has a default in the schema; defaults live in the YAML"
        )
        value = node[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _assert_schema_matches(hint, value, key)
            continue
        origin = typing.get_origin(hint)
        allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
        if typing.Any in allowed:
            continue
        kinds = tuple(typing.get_origin(a) or a for a in allowed)
        if float in kinds:
            kinds = (*kinds, int)  # YAML's 120 for a float field
        if tuple in kinds or list in kinds:
            kinds = (*kinds, tuple, list)  # a YAML list: a list in the container, a tuple field in a schema
        assert isinstance(value, kinds), f"{key}={value!r} is not {hint}"


@pytest.mark.parametrize("app", ["generate", "compare", "train_tiny", "calibrate"])
def test_the_schema_and_the_yaml_agree(app, tmp_path):
    schema = _schemas().get(app)
    if schema is None:
        pytest.skip(f"{app} registers no schema with Hydra's ConfigStore yet (see _calibrate_schema)")
    from hydra.core.config_store import ConfigStore

    assert ConfigStore.instance().load(f"{app}_schema.yaml").node is not None  # registered
    cfg = compose(app, [], tmp_path)
    assert not OmegaConf.missing_keys(cfg), f"{app}: keys without a value in the YAML"
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert set(plain) == _yaml_keys(app), f"{app}: the composed keys are not the YAML's and its groups'"
    _assert_schema_matches(schema, plain, "")
    if app == "calibrate":  # its YAML does not name the schema: parse_config checks and types it
        from calibrate.config import parse_config

        typed = parse_config(cfg)
    else:
        typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, schema)


@pytest.mark.parametrize(
    "app, override, message",
    [
        ("generate", "batch_size=0", "batch_size=0; give a positive integer or auto"),
        ("compare", "batch_size=-1", "batch_size=-1; give a positive integer or auto"),
        ("generate", "batch_size=some", "batch_size='some'; give a positive integer or auto"),
        ("compare", "n_prompts=0", "n_prompts=0; give at least 1"),
        ("compare", "warmup=-1", "warmup=-1; give 0 or more"),
        ("compare", "+bogus=1", "bad config: Key 'bogus' not in 'CompareConfig'"),
        ("generate", "+backbone_name=x", "bad config: Key 'backbone_name' not in 'GenerateConfig'"),
    ],
)
def test_zero_or_negative_counts_are_one_line_errors(app, override, message, tmp_path, capsys):
    """Counts the old commands turned into 4 or 1 silently (n_prompts=0, batch_size=0), and keys the
    schema lacks, are refused before any weights load (infinity-2b has none here)."""
    from toprovar.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main([app, "backbone=infinity-2b", override, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1] == f"toprovar {app}: error: {message}", err


@pytest.mark.parametrize(
    "override, message",
    [
        ("vae.steps=0", "vae.steps=0; give at least 1"),
        ("transformer.batch=-4", "transformer.batch=-4; give at least 1"),
        ("eval.prompts=0", "eval.prompts=0; give at least 1"),
        ("transformer.warmup=-1", "transformer.warmup=-1; give 0 or more"),
        ("+vae.bogus=1", "bad config: Key 'bogus' not in 'VAETrainConfig'"),
    ],
)
def test_train_tiny_counts_are_checked(override, message, tmp_path):
    from toprovar.tiny.train import check_config, parse_config

    with pytest.raises(UserError) as caught:
        check_config(parse_config(compose("train_tiny", [override], tmp_path)))  # parse_config refuses the key
    assert str(caught.value) == message

"""calibrate's config schema (issue 23 item 3): one dataclass schema registered with Hydra's
ConfigStore, no defaults of its own, and every composition of toprovar/conf/calibrate.yaml fits it."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from calibrate.config import SCHEMA_NAME, CalibrationConfig, register_schema
from tests.conftest import compose


def _leaves_missing(node, path="") -> list[str]:
    """Paths of the schema's leaves that have a value (a default)."""
    found = []
    for key in node:
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            continue
        if OmegaConf.is_config(child) and not child._is_none():
            found += _leaves_missing(child, f"{path}{key}.")
        else:
            found.append(f"{path}{key}")
    return found


def test_the_schema_is_registered_and_has_no_defaults():
    from hydra.core.config_store import ConfigStore

    assert register_schema() == SCHEMA_NAME
    node = ConfigStore.instance().load(f"{SCHEMA_NAME}.yaml").node
    assert set(node.keys()) == {f.name for f in dataclasses.fields(CalibrationConfig)}
    assert _leaves_missing(node) == []  # the YAML is the only source of defaults


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["storage=memory", "tracking=off"],
        ["storage=sqlite", "tracking=server"],
        ["backbone=test-small", "storage=journal", "tracking=local"],
        ["backbone=infinity-2b"],
        ["backbone=infinity-8b"],
    ],
)
def test_every_composed_config_fits_the_schema_key_for_key(tmp_path, overrides):
    """Merged onto the schema the composed YAML gains no key and misses none (a key only one side has
    fails here), and every value has the schema's type."""
    cfg = compose("calibrate", overrides, tmp_path)
    schema = OmegaConf.structured(CalibrationConfig)
    typed = OmegaConf.to_object(OmegaConf.merge(schema, cfg))  # unknown keys and wrong types raise
    assert isinstance(typed, CalibrationConfig)
    for field in dataclasses.fields(CalibrationConfig):
        value = getattr(typed, field.name)
        if dataclasses.is_dataclass(value):  # a typed group: the YAML sets each of its fields
            assert set(cfg[field.name].keys()) == {f.name for f in dataclasses.fields(value)}, field.name
    assert set(cfg.keys()) == {f.name for f in dataclasses.fields(CalibrationConfig)}

"""Policy schema: shipped files load, round trip, and every kind of bad input is a one-line error."""
from __future__ import annotations

import pytest
import yaml

from toprovar import load_policy
from toprovar.errors import UserError
from toprovar.policy import Policy, policy_from_dict, save_policy, shipped_policies


def test_shipped_policies_load_and_refuse_other_backbones() -> None:
    names = shipped_policies()
    assert {"infinity-2b", "infinity-8b", "fastvar-infinity-2b", "fastvar-infinity-8b"} <= set(names)
    for name in names:
        policy = load_policy(name)
        assert isinstance(policy, Policy) and policy.name == name
        if policy.backbone:
            load_policy(name, backbone=policy.backbone)
            with pytest.raises(UserError, match="made for backbone"):
                load_policy(name, backbone="some-other-backbone")
    assert load_policy("infinity-2b").provenance["calibrated"] is False


def test_round_trip_through_yaml(tmp_path) -> None:
    doc = {"method": "toprovar", "variant": "scale_layer", "backbone": "tiny",
           "scale": {"tau": 0.35, "crossing": "above", "action": "exit", "min_scale": 3},
           "layer": {"mode": "static", "beta": 2.5, "ratios": [1.5, 3.0, 1.1], "skip_above": 0.7},
           "token": {"alpha_min": 0.05, "alpha_max": 0.9, "min_keep": 0.2, "normalize": "rank",
                     "restore": "cached", "cache_scale": 5},
           "fastvar": {"ratios": {8: 0.5}}, "provenance": {"trials": 12}}
    policy = policy_from_dict(doc)
    again = load_policy(save_policy(policy, tmp_path / "p.yaml"))
    assert again.to_dict() == policy.to_dict()
    assert again.layer.ratios == (1.5, 3.0, 1.1) and again.scale.crossing == "above"
    assert again.uses_layer and not again.uses_token
    assert again.token.restore == "cached" and again.token.cache_scale == 5
    assert policy_from_dict({"method": "toprovar"}).token.restore == "none"  # default: pass-through


@pytest.mark.parametrize("doc, where", [
    ({"method": "toprovar", "colour": 1}, "colour"),
    ({"method": "toprovar", "scale": {"tua": 0.4}}, "scale.tua"),
    ({"method": "prune-everything"}, "method"),
    ({"scale": {"tau": 0.4}}, "method"),
    ({"method": "toprovar", "scale": {"tau": 1.5}}, "scale.tau"),
    ({"method": "toprovar", "scale": {"tau": "low"}}, "scale.tau"),
    ({"method": "toprovar", "scale": {"crossing": "sideways"}}, "scale.crossing"),
    ({"method": "toprovar", "token": {"alpha_min": 0.7, "alpha_max": 0.2}}, "token.alpha_max"),
    ({"method": "toprovar", "token": {"protect_layers": 0}}, "token.protect_layers"),
    ({"method": "toprovar", "token": {"restore": "interpolate"}}, "token.restore"),
    ({"method": "toprovar", "token": {"cache_scale": -1}}, "token.cache_scale"),
    ({"method": "toprovar", "layer": {"ratios": [0.5]}}, "layer.ratios"),
    ({"method": "toprovar", "layer": {"beta": True}}, "layer.beta"),
    ({"method": "fastvar", "fastvar": {"ratios": {"x": 0.4}}}, "fastvar.ratios"),
    ({"method": "fixed_exit", "fixed_exit": {"exit_scale": 2.5}}, "fixed_exit.exit_scale"),
    ({"method": "toprovar", "version": 7}, "version"),
])
def test_bad_documents_are_one_line_errors(tmp_path, doc, where) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError) as err:
        load_policy(path)
    message = str(err.value)
    assert "\n" not in message and where in message and str(path) in message


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown policy 'nope'"):
        load_policy("nope")
    with pytest.raises(UserError, match="not found"):
        load_policy(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [toprovar\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_policy(broken)

"""Policy schema: shipped files load, round trip, and every kind of bad input is a one-line error."""

from __future__ import annotations

import re

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
    doc = {
        "method": "toprovar",
        "variant": "scale_layer",
        "backbone": "tiny",
        "scale": {"tau": 0.35, "crossing": "above", "action": "exit", "min_scale": 3},
        "layer": {"mode": "static", "beta": 2.5, "ratios": [1.5, 3.0, 1.1], "skip_above": 0.7},
        "token": {
            "alpha_min": 0.05,
            "alpha_max": 0.9,
            "min_keep": 0.2,
            "normalize": "rank",
            "restore": "cached",
            "cache_scale": 2,
        },
        "fastvar": {"ratios": {8: 0.5}},
        "provenance": {"trials": 12},
    }
    policy = policy_from_dict(doc)
    again = load_policy(save_policy(policy, tmp_path / "p.yaml"))
    assert again.to_dict() == policy.to_dict()
    assert again.layer.ratios == (1.5, 3.0, 1.1) and again.scale.crossing == "above"
    assert again.uses_layer and not again.uses_token
    assert again.token.restore == "cached" and again.token.cache_scale == 2
    assert policy_from_dict({"method": "toprovar"}).token.restore == "none"  # default: pass-through


@pytest.mark.parametrize(
    "doc, where",
    [
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
    ],
)
def test_bad_documents_are_one_line_errors(tmp_path, doc, where) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError) as err:
        load_policy(path)
    message = str(err.value)
    assert "\n" not in message and where in message and str(path) in message


def test_missing_and_malformed_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown policy 'nope'"):
        load_policy("nope")
    with pytest.raises(UserError, match="not found"):
        load_policy(tmp_path / "absent.yaml")
    for folder in (tmp_path, tmp_path / "policies.yaml"):  # issue 22: a folder was "not found"
        folder.mkdir(exist_ok=True)
        with pytest.raises(UserError, match=f"^{re.escape(str(folder))}: is a folder, not a policy file"):
            load_policy(folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like a shipped policy: the name is the policy
    assert load_policy("tiny").backbone == "tiny"
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [toprovar\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_policy(broken)


# -- issue 15: every value checked, before any weights load -----------------------------------------


def _one_line_error(doc_or_text, tmp_path, backbone=None, **options) -> str:
    path = tmp_path / "p.yaml"
    if isinstance(doc_or_text, bytes):
        path.write_bytes(doc_or_text)
    else:
        path.write_text(doc_or_text if isinstance(doc_or_text, str) else yaml.safe_dump(doc_or_text))
    with pytest.raises(UserError) as err:
        load_policy(path, backbone, **options)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize(
    "section, key, lo, hi",
    [
        ("scale", "tau", "0", "1"),
        ("layer", "beta", "0", "100"),
        ("layer", "skip_above", "0", "1"),
        ("token", "alpha_min", "0", "1"),
        ("token", "alpha_max", "0", "1"),
        ("token", "min_keep", "0", "1"),
    ],
)
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "1.0e+400"])
def test_non_finite_numbers_name_key_value_and_range(tmp_path, section, key, lo, hi, bad) -> None:
    text = f"method: toprovar\n{section}:\n  {key}: {bad}\n"
    message = _one_line_error(text, tmp_path)
    assert f"{section}.{key}" in message and f"[{lo}, {hi}]" in message and "finite" in message
    assert ("nan" if "nan" in bad else "inf") in message


@pytest.mark.parametrize(
    "text, where",
    [
        ("method: toprovar\nlayer: {ratios: [1.5, .inf, 2.0]}\n", "layer.ratios[1]"),
        ("method: toprovar\nlayer: {ratios: [1.5, .nan]}\n", "layer.ratios[1]"),
        ("method: toprovar\nlayer: {ratios: [1" + "0" * 400 + "]}\n", "layer.ratios[0]"),  # beyond float range
        ("method: fastvar\nfastvar: {ratios: {9: .nan}}\n", "fastvar.ratios[9]"),
        ("method: fastvar\nfastvar: {ratios: {9.5: 0.4}}\n", "fastvar.ratios: got key 9.5"),
        ("method: fastvar\nfastvar: {ratios: {9: 0.4, '9': 0.5}}\n", "fastvar.ratios"),
        ("method: fastvar\nfastvar: {ratios: {}}\n", "fastvar.ratios"),
        ("method: fastvar\nfastvar: {ratios: {9: 0.4}, layers: [5, 5]}\n", "fastvar.layers[1]"),
        ("method: fastvar\nfastvar: {ratios: {9: 0.4}, cache_scale: 9}\n", "fastvar.cache_scale"),
        ("method: toprovar\nscale: {min_scale: 4}\ntoken: {cache_scale: 4}\n", "token.cache_scale"),
        ("method: toprovar\nscale: {min_scale: 2.0}\n", "scale.min_scale"),
        ("method: toprovar\nname: mine\n", "name"),
        ("method: toprovar\nversion: true\n", "version"),
        ("method: toprovar\nbackbone: ''\n", "backbone"),
        ("method: toprovar\nprovenance: [a]\n", "provenance"),
        ("method: toprovar\nscale: {1: 2, null: 3}\n", "scale.1"),
        ("[method, toprovar]\n", "document"),
        ("", "empty"),
        ("method: [toprovar\n", "not valid YAML"),
        ("method: toprovar\nscale: {tau: 0.4\n", "line 3"),
        ("method: toprovar\n---\nmethod: none\n", "not valid YAML"),
        ("method: toprovar\nprovenance: " + "[" * 5000 + "]" * 5000 + "\n", "policy"),
    ],
)
def test_bad_values_and_files_are_one_line_errors(tmp_path, text, where) -> None:
    assert where in _one_line_error(text, tmp_path)


def test_binary_oversized_and_odd_paths_are_one_line_errors(tmp_path) -> None:
    assert "not a text file" in _one_line_error(bytes(range(256)) * 4, tmp_path)
    assert "not a policy file" in _one_line_error("method: none\n" + "#" * (2 << 20), tmp_path)
    for given in ("", "a\0b", "x" * 5000, str(tmp_path)):
        with pytest.raises(UserError) as err:
            load_policy(given)
        assert "\n" not in str(err.value)
    for given in (5, ["tiny"], {"method": "none"}, None):
        with pytest.raises(UserError, match="is not a policy"):
            load_policy(given)


def test_saved_policy_loads_back_equal_and_invalid_ones_are_not_written(tmp_path) -> None:
    import dataclasses

    for name in shipped_policies():
        policy = load_policy(name)
        again = load_policy(save_policy(policy, tmp_path / f"{name}.yaml"))
        assert again == policy
    bad = dataclasses.replace(Policy(method="toprovar"), scale=dataclasses.replace(Policy().scale, tau=float("nan")))
    with pytest.raises(UserError, match="scale.tau"):
        save_policy(bad, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


# -- the backbone in use ----------------------------------------------------------------------------


def test_every_shipped_and_documented_policy_fits_its_backbone() -> None:
    from pathlib import Path

    from toprovar.models.registry import get_backbone

    documented = sorted((Path(__file__).parent.parent / "docs" / "policies").glob("*/*.yaml"))
    assert documented
    for given in [*shipped_policies(), *documented]:
        policy = load_policy(given)
        assert load_policy(given, get_backbone(policy.backbone)) == policy


@pytest.mark.parametrize(
    "doc, backbone, options, where, allowed",
    [
        ({"method": "toprovar", "scale": {"min_scale": 11}}, "tiny", {}, "scale.min_scale", "[0, 10]"),
        (
            {"method": "toprovar", "layer": {"mode": "online", "representative_scale": 11}},
            "tiny",
            {},
            "layer.representative_scale",
            "[0, 10]",
        ),
        ({"method": "toprovar", "layer": {"ratios": [1.5] * 13}}, "tiny", {}, "layer.ratios", "12, one per layer"),
        ({"method": "toprovar", "token": {"protect_layers": 2}}, "test-small", {}, "token.protect_layers", "[1, 1]"),
        ({"method": "fixed_exit", "fixed_exit": {"exit_scale": 11}}, "tiny", {}, "fixed_exit.exit_scale", "[0, 10]"),
        (
            {"method": "fastvar", "fastvar": {"ratios": {11: 0.5}, "layers": [1, 10]}},
            "tiny",
            {},
            "fastvar.ratios: got key 11",
            "[0, 10]",
        ),
        ({"method": "fastvar", "fastvar": {"ratios": {9: 0.5}}}, "tiny", {}, "fastvar.layers", "end <= 12"),
        (
            {"method": "fastvar", "fastvar": {"ratios": {9: 0.4, 10: 0.6}}},
            "infinity-2b",
            {"pixels": "0.06M"},
            "fastvar.ratios: got key 9",
            "[0, 6]",
        ),
        ({"method": "toprovar", "backbone": "infinity-2b"}, "tiny", {}, "made for backbone 'infinity-2b'", "'tiny'"),
    ],
)
def test_policies_that_do_not_fit_the_run_are_refused_before_weights_load(
    tmp_path, doc, backbone, options, where, allowed
) -> None:
    from toprovar.models.registry import get_backbone

    message = _one_line_error(doc, tmp_path, get_backbone(backbone), **options)
    assert where in message and allowed in message and f"'{backbone}'" in message
    if "made for backbone" not in where:
        assert "got" in message


def test_backbone_check_edges_and_explicit_override(tmp_path) -> None:
    from toprovar.models.registry import get_backbone
    from toprovar.policy import check_policy_for_backbone, check_policy_for_spec

    tiny = get_backbone("tiny")
    last = policy_from_dict({"method": "fixed_exit", "fixed_exit": {"exit_scale": 10}})
    assert check_policy_for_spec(last, tiny) is last  # the last scale of the 11 is inside the schedule
    shipped_2b = load_policy("fastvar-infinity-2b")
    assert load_policy("fastvar-infinity-2b", get_backbone("infinity-2b"), pixels="0.60M") == shipped_2b
    # An explicit override waives the name only: the 2B policy fits 8B's schedule and depth, not tiny's.
    assert load_policy("fastvar-infinity-2b", get_backbone("infinity-8b"), allow_other_backbone=True) == shipped_2b
    with pytest.raises(UserError, match="fastvar.layers"):
        load_policy("fastvar-infinity-2b", tiny, allow_other_backbone=True)
    with pytest.raises(UserError, match="layer.ratios: got 12 values, expected 2, one per layer"):
        load_policy("tiny", get_backbone("test-small"), pixels="1M", allow_other_backbone=True)
    assert load_policy("infinity-2b", "infinity-8b", allow_other_backbone=True).backbone == "infinity-2b"
    # Plain numbers for callers that know the schedule (e.g. a custom h_div_w template).
    shipped_min_scale = load_policy("tiny").scale.min_scale
    assert shipped_min_scale > 7  # the shipped policy starts pruning late: it cannot fit 8 scales
    with pytest.raises(
        UserError, match=rf"scale.min_scale: got {shipped_min_scale}, expected a scale index in \[0, 7\]"
    ):
        check_policy_for_backbone(load_policy("tiny"), backbone="tiny", n_scales=8, depth=12)
    with pytest.raises(UserError, match="pixels='2M' is not a pixel budget"):
        load_policy("infinity-2b", get_backbone("infinity-2b"), pixels="2M")

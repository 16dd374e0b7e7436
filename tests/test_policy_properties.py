"""Issue 15 item 2: any mutation of a valid policy loads and round-trips, or is one UserError line.

Property tests over the policy schema (strategies in tests/strategies.py): documents given as
Python data (`policy_from_dict`) and as files (`load_policy`: YAML text, truncated, spliced, random
bytes), then the backbone check with schedules and depths around the real ones. Whatever the
input, the only exception allowed is `UserError` with a one-line message; what loads is saved and
loaded again unchanged. Derandomized for CI (tests/strategies.py: TOPROVAR_HYPOTHESIS=explore
draws fresh examples).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from tests.strategies import mutated_policy_documents, policy_texts, property_settings, valid_policy_documents
from toprovar.errors import UserError
from toprovar.policy import Policy, check_policy_for_backbone, load_policy, policy_from_dict, save_policy


def _one_line(err: UserError) -> str:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert len(message) < 500, message  # values are quoted short, whatever was given
    return message


def _assert_round_trip(policy: Policy) -> None:
    """save -> load gives the same policy (provenance compared as YAML: it may hold NaN, which != itself)."""
    with tempfile.TemporaryDirectory() as folder:
        again = load_policy(save_policy(policy, Path(folder) / "p.yaml"))
    assert again.name == "p"
    assert dataclasses.replace(again, name=None, provenance={}) == dataclasses.replace(policy, name=None, provenance={})
    assert yaml.safe_dump(again.to_dict()) == yaml.safe_dump(policy.to_dict())


@property_settings(ci_examples=150)
@given(valid_policy_documents())
def test_valid_documents_load_and_round_trip(doc) -> None:
    _assert_round_trip(policy_from_dict(doc))


@property_settings(ci_examples=300)
@given(mutated_policy_documents())
@example({"method": "toprovar", "layer": {"beta": float("nan")}})
@example({"method": "toprovar", "token": {"alpha_min": float("nan")}})
@example({"method": "toprovar", "layer": {"ratios": [1.5, float("inf")]}})
@example({"method": "fastvar", "fastvar": {"ratios": {10**400: 0.5}}})
def test_mutated_documents_load_or_fail_in_one_line(doc) -> None:
    try:
        policy = policy_from_dict(doc)
    except UserError as err:
        assert _one_line(err).startswith("policy ")
        return
    _assert_round_trip(policy)


@property_settings(ci_examples=300)
@given(policy_texts())
@example(b"\x89PNG\r\n\x1a\n\x00\x00")
@example(b"method: toprovar\nscale: {tau: .nan}\n")
@example(b"method: toprovar\nlayer: {ratios: [")
def test_policy_files_load_or_fail_in_one_line(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "given.yaml"
        path.write_bytes(content)
        try:
            policy = load_policy(path)
        except UserError as err:
            assert str(path) in _one_line(err)
            return
    _assert_round_trip(policy)


@property_settings(ci_examples=200)
@given(
    valid_policy_documents(),
    st.integers(1, 14),
    st.integers(1, 41),
    st.sampled_from(["tiny", "infinity-2b"]),
    st.booleans(),
)
def test_backbone_check_accepts_or_fails_in_one_line(doc, n_scales, depth, backbone, allow_other) -> None:
    policy = policy_from_dict(doc)
    try:
        assert (
            check_policy_for_backbone(
                policy, backbone=backbone, n_scales=n_scales, depth=depth, allow_other_backbone=allow_other
            )
            is policy
        )
    except UserError as err:
        message = _one_line(err)
        if "made for backbone" not in message:  # a fit error names the run it does not fit
            assert f"{n_scales} scales, {depth} layers" in message
        return
    # Accepted: every index it runs is inside the schedule and the depth, and the backbone matches.
    assert allow_other or policy.backbone in (None, backbone)
    if policy.method == "toprovar":
        assert policy.scale.min_scale < n_scales and policy.token.protect_layers < depth
        assert policy.layer.ratios is None or len(policy.layer.ratios) == depth
    elif policy.method == "fastvar":
        assert max(policy.fastvar.ratios) < n_scales and policy.fastvar.layers[1] <= depth
        assert policy.fastvar.exit_after_scale is None or policy.fastvar.exit_after_scale < n_scales
    elif policy.method == "fixed_exit":
        assert policy.fixed_exit.exit_scale < n_scales
    skip = policy.guidance.skip_uncond_from_scale
    assert skip is None or skip < n_scales  # any method

"""Hypothesis strategies shared by the property tests: policy documents and their mutations, Hydra overrides.

`valid_policy_documents()` draws documents the policy schema must accept (every method, every
field, sections left out at random); `mutated_policy_documents()` breaks one of them in the ways
a person or a tool does (wrong types, NaN/inf, out-of-range or huge numbers, unknown or deleted
keys, a section replaced); `policy_texts()` adds text-level damage (truncated at any point, junk
spliced in) and random bytes. `override_strings(keys)` draws command-line overrides for a Hydra
app whose config has `keys` (`config_keys` lists them by composing the config once).

`PROPERTY_SETTINGS` are the settings of every property test: derandomized with a moderate example
count for CI (same examples on every run, no database written); `TOPROVAR_HYPOTHESIS=explore` draws
fresh random examples, more of them, to look for failures before committing.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from toprovar.policy import FASTVAR_PLANS, METHODS, ORDERS, RESTORE_MODES, VARIANTS

_EXPLORE = os.environ.get("TOPROVAR_HYPOTHESIS") == "explore"


def property_settings(ci_examples: int) -> settings:
    """CI: `ci_examples` derandomized examples; explore mode: 5x as many, fresh random ones."""
    return settings(
        max_examples=ci_examples * (5 if _EXPLORE else 1),
        derandomize=not _EXPLORE,
        database=None,
        deadline=None,
        print_blob=_EXPLORE,
        suppress_health_check=[HealthCheck.too_slow],
    )


# -- policy documents ------------------------------------------------------------------------------

MAX_SCALE = 14  # a little past the longest schedule (13 scales), so that backbone checks both pass and fail
unit = st.floats(0.0, 1.0, allow_nan=False)
scale_index = st.integers(0, MAX_SCALE)
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20), st.dates()
)
# Free-form provenance: anything YAML holds (NaN included: provenance is a record, not a knob).
provenance_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=12,
)


def _maybe(section: dict[str, Any], draw, optional: dict[str, st.SearchStrategy]) -> dict[str, Any]:
    """`section` plus a random subset of the `optional` keys (the rest keep the schema defaults)."""
    for key, strategy in optional.items():
        if draw(st.booleans()):
            section[key] = draw(strategy)
    return section


@st.composite
def valid_policy_documents(draw) -> dict[str, Any]:
    """A policy document that must load: every value inside the schema's ranges."""
    method = draw(st.sampled_from(METHODS))
    min_scale = draw(scale_index)
    alphas = sorted(draw(st.lists(unit, min_size=2, max_size=2)))
    doc: dict[str, Any] = {"method": method}
    _maybe(
        doc,
        draw,
        {
            "version": st.just(1),
            "variant": st.sampled_from(VARIANTS),
            "backbone": st.one_of(st.none(), st.sampled_from(["tiny", "infinity-2b", "infinity-8b"])),
            "provenance": st.one_of(st.none(), st.dictionaries(st.text(max_size=10), provenance_values, max_size=4)),
        },
    )
    if draw(st.booleans()):
        doc["scale"] = _maybe(
            {"min_scale": min_scale},
            draw,
            {
                "tau": unit,
                "crossing": st.sampled_from(["below", "above"]),
                "action": st.sampled_from(["start_pruning", "exit"]),
            },
        )
    else:
        min_scale = 0
    if draw(st.booleans()):
        doc["layer"] = _maybe(
            {},
            draw,
            {
                "mode": st.sampled_from(["static", "online"]),
                "beta": st.floats(0.0, 100.0),
                "ratios": st.one_of(st.none(), st.lists(st.floats(1.0, 1e6), min_size=1, max_size=40)),
                "skip_above": st.one_of(st.none(), unit),
                "representative_scale": st.one_of(st.none(), scale_index),
            },
        )
    if draw(st.booleans()):
        cache = st.none() if min_scale == 0 else st.one_of(st.none(), st.integers(0, min_scale - 1))
        doc["token"] = _maybe(
            {"alpha_min": alphas[0], "alpha_max": alphas[1]},
            draw,
            {
                "min_keep": unit,
                "normalize": st.sampled_from(["mean", "sum", "rank"]),
                "protect_layers": st.integers(1, 40),
                "restore": st.sampled_from(RESTORE_MODES),
                "order": st.sampled_from(ORDERS),
                "cache_scale": cache,
            },
        )
    if method == "fastvar" or draw(st.booleans()):
        ratios = draw(st.dictionaries(scale_index, unit, min_size=1 if method == "fastvar" else 0, max_size=5))
        start = draw(st.integers(0, 39))
        fastvar: dict[str, Any] = {"ratios": ratios}
        _maybe(
            fastvar,
            draw,
            {
                "layers": st.tuples(st.just(start), st.integers(start + 1, 40)).map(list),
                "cache_scale": st.one_of(st.none(), st.integers(0, min(ratios) - 1))
                if ratios and min(ratios) > 0
                else st.none(),
                "exit_after_scale": st.one_of(st.none(), st.integers(max(ratios, default=0), MAX_SCALE)),
                "plan": st.sampled_from(FASTVAR_PLANS),
            },
        )
        doc["fastvar"] = fastvar
    if draw(st.booleans()):
        doc["fixed_exit"] = {"exit_scale": draw(scale_index)}
    if draw(st.booleans()):
        doc["guidance"] = {"skip_uncond_from_scale": draw(st.one_of(st.none(), scale_index))}
    return doc


# Values that break a field: wrong types, non-finite or out-of-range numbers, huge ones, containers.
odd_values = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            -1,
            -0.5,
            1.5,
            101.0,
            2**64,
            -(2**64),
            10**400,
            1e308,
            0,
            1,
            True,
            False,
            None,
            "",
            "0.4",
            "none",
            [],
            {},
            [1.5],
            {9: 0.4},
            dt.date(2024, 1, 1),
        ]
    ).map(copy.deepcopy),  # a fresh copy: later mutations must not change the shared constant
    yaml_scalars,
    provenance_values,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the nested mappings/lists of a document (the document itself is ())."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _at(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


@st.composite
def mutated_policy_documents(draw) -> Any:
    """A valid document with one to three mutations; it may still be valid (e.g. 0.4 -> 1)."""
    doc = draw(valid_policy_documents())
    if draw(st.integers(0, 19)) == 0:  # now and then not a mapping at all
        return draw(odd_values)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(["replace", "replace", "delete", "unknown_key"]))
        if not path:  # the document itself: add a key to it
            op = "unknown_key"
        parent = _at(doc, path[:-1]) if path else None
        if op == "replace":
            parent[path[-1]] = draw(odd_values)
        elif op == "delete" and parent is not None:
            del parent[path[-1]]
        else:
            target = _at(doc, path)
            if isinstance(target, dict):
                target[draw(st.one_of(st.text(max_size=12), st.integers(), st.none()))] = draw(odd_values)
            elif parent is not None:
                parent[path[-1]] = draw(odd_values)
    return doc


def _dump(doc: Any) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def policy_texts(draw) -> bytes:
    """The bytes of a policy file: a (mutated) document as YAML, maybe truncated or spliced, or random bytes."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "truncated", "spliced", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    doc = draw(valid_policy_documents() if kind == "valid" else mutated_policy_documents())
    text = _dump(doc)
    if kind == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "spliced":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.text(alphabet=string.printable + "{}[]:,'\"&*!|>%@`#\x00\x85é", max_size=12))
            + text[at:]
        )
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate makes the file invalid UTF-8, as it should


# -- Hydra overrides -------------------------------------------------------------------------------


def config_keys(conf_dir: str | Path, config_name: str) -> list[str]:
    """Dotted keys of a composed Hydra config (leaves and sections) plus its config group names."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base=None, job_name="keys"):
        cfg = OmegaConf.to_container(compose(config_name=config_name), resolve=False)
    groups = sorted(p.name for p in Path(conf_dir).iterdir() if p.is_dir())

    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        out = []
        for key, value in node.items():
            out += [prefix + str(key), *walk(value, f"{prefix}{key}.")]
        return out

    return sorted(set(walk(cfg, "") + groups))


override_values = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "nan",
            "inf",
            "-inf",
            ".nan",
            "1e400",
            "-1",
            "0",
            "3",
            "0.5",
            "[]",
            "{}",
            "[1,2]",
            "[a,b]",
            "{a:1}",
            "'quoted'",
            '"a b"',
            "${now:%Y}",
            "${missing.key}",
            "${backbone.name}",
            "tiny",
            "infinity-2b",
            "none",
            "''",
            "[",
            "}",
            "a=b",
            "\\",
            "🙂",
            "\x00",
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + "._-[]{},:'\"$=+~ %\\/", max_size=15),
)


def override_strings(keys: Sequence[str]) -> st.SearchStrategy[str]:
    """One command-line override for a Hydra app with config keys `keys`: known or made-up keys, the
    `+`, `++` and `~` forms, odd values (NaN, huge numbers, broken brackets, interpolations, NUL), or
    raw junk."""
    key = st.one_of(
        st.sampled_from(list(keys)),
        st.sampled_from(list(keys)).map(lambda k: k + ".extra"),
        st.text(alphabet=string.ascii_lowercase + "._-/@", min_size=1, max_size=12),
    )
    assign = st.tuples(st.sampled_from(["", "", "+", "++"]), key, override_values).map(lambda t: f"{t[0]}{t[1]}={t[2]}")
    delete = st.tuples(key, st.one_of(st.just(""), override_values.map(lambda v: "=" + v))).map(
        lambda t: f"~{t[0]}{t[1]}"
    )
    return st.one_of(assign, assign, assign, delete, st.text(max_size=20))

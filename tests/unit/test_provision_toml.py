"""The TOML writer behind hotsite.toml from inventory variables: what it writes, tomllib reads back."""

from __future__ import annotations

import datetime
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning import tomlw
from tests.conftest import REPO

keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
    st.datetimes(timezones=st.just(datetime.UTC)).map(lambda d: d.replace(microsecond=0)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
documents = st.dictionaries(
    keys,
    st.one_of(values, st.lists(st.dictionaries(keys, values, max_size=3), min_size=1, max_size=3)),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(documents)
def test_what_is_written_reads_back_the_same(doc: dict) -> None:
    assert tomllib.loads(tomlw.dumps(doc)) == doc


def test_the_shipped_example_config_survives_the_round_trip() -> None:
    example = tomllib.loads((REPO / "appliance/examples/hotsite.example.toml").read_text())
    text = tomlw.dumps(example)
    assert tomllib.loads(text) == example
    assert tomlw.dumps(tomllib.loads(text)) == text  # deterministic: a second render is byte-identical


def test_tables_and_arrays_of_tables_come_out_as_a_person_would_write_them() -> None:
    text = tomlw.dumps(
        {
            "appliance": {"name": "dr-1"},
            "contacts": [{"name": "A"}, {"name": "B"}],
            "sites": {"primary": {"role": "primary", "checks": {"acd": {"url": "tcp://x:1"}}}},
        }
    )
    assert '[appliance]\nname = "dr-1"' in text
    assert text.count("[[contacts]]") == 2
    assert "[sites.primary.checks.acd]" in text
    assert "[sites]" not in text  # implicit parent tables are not written


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"a": {"b": None}}, "a.b: null has no TOML form"),
        ({"a": float("nan")}, "a: nan cannot be written"),
        ({"a": {1, 2}}, "a: a set has no TOML form"),
        ({"a": {3: "x"}}, "a: key 3 is not a string"),
    ],
)
def test_values_toml_cannot_hold_are_named_by_key_path(doc: dict, message: str) -> None:
    with pytest.raises(tomlw.TomlError, match=message.replace(".", r"\.")):
        tomlw.dumps(doc)

"""The config's YAML is read with libyaml when available (issue 10: a 10,000-account config
took seconds in the pure-Python parser): the same data as ``yaml.safe_load``, and the same
error for a document it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.config import _safe_load

REPO_ROOT = Path(__file__).resolve().parents[2]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(VALUES, st.booleans())
def test_the_fast_loader_reads_what_safe_load_reads(value: object, flow: bool) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    assert _safe_load(text) == yaml.safe_load(text)


def test_the_example_config_reads_the_same() -> None:
    text = (REPO_ROOT / "config.example.yaml").read_text(encoding="utf-8")
    assert _safe_load(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "text",
    ["a: 1\nb: [1, 2\n", "accounts:\n  - name: x\n   bad: indent\n", "a: !!python/tuple [1]\n"],
)
def test_a_refused_document_raises_the_pure_parsers_error(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as fast:
        _safe_load(text)
    with pytest.raises(yaml.YAMLError) as pure:
        yaml.safe_load(text)
    assert str(fast.value) == str(pure.value)

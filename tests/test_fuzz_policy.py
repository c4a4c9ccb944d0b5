"""Fuzzing the policy loader: any text or document is a Policy or a PolicyError.

``bulwark policy apply`` and every component's PolicyHolder catch
``PolicyError`` and keep the running policy; any other exception is a
traceback for the administrator, or a component that stops on a published
document it cannot read.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from bulwark.policy import Policy, PolicyError, from_document, parse
from streams.checks import CHECKS

from .fuzz_strategies import fuzz_settings, json_values

BASE = {
    "hostname": "gw.example.com",
    "local_domains": ["example.com"],
    "mail_servers": [{"name": "mx", "host": "10.1.1.1", "default": True, "trusted_addresses": ["192.0.2.10"]}],
}

#: Every section of the policy and the fields under it, so generated
#: documents reach the validators rather than stopping at "extra field".
SECTIONS = sorted(Policy.model_fields)
SUBFIELDS = sorted({
    name
    for info in Policy.model_fields.values()
    for model in [getattr(info.annotation, "model_fields", None)] if model
    for name in model
} | {"enabled", "when_found", "rules", "archives", "max_depth", "threshold_senders", "trusted_addresses"})

# YAML scalars that construct to something other than what they look like,
# or fail to: timestamps, tags, special floats, octal and sexagesimal ints.
yaml_scalars = st.sampled_from([
    "2001-12-14", "2001-13-45", "2001-02-30t25:61:61Z", "!!timestamp 2001-99-99", "!!binary aGk=", "!!binary ***",
    ".nan", "-.inf", "0o777", "0x_ff", "1_000", "190:20:30", "~", "null", "yes", "No", "!!str 1", "!!int x",
    "!!float x", "!!set {a, b}", "!!omap [a: 1]", "!!python/object:os.system {}", "*undefined", "&a 1", "'''",
    "\"\\x\"", "|-\n  text", ">\n folded", "[a, {b: c}]", "{? [a]: 1}", "\t", "\x00", "\ufeff", "é", "\\",
])

yaml_keys = st.sampled_from(SECTIONS + SUBFIELDS) | st.text(max_size=8)


@st.composite
def yaml_documents(draw) -> str:
    """A policy text: the base, then sections whose values are drawn from hostile YAML."""
    lines = ["hostname: gw.example.com", "local_domains: [example.com]"]
    for _ in range(draw(st.integers(0, 6))):
        key = draw(yaml_keys)
        depth = draw(st.integers(0, 3))
        value = draw(yaml_scalars | st.text(max_size=12))
        for _ in range(depth):
            value = "{" + draw(yaml_keys) + ": " + value + "}" if draw(st.booleans()) else "[" + value + "]"
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def loads_or_names_the_problem(text: str) -> None:
    try:
        parse(text, "fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("invalid policy\nfuzz.yaml:")


@fuzz_settings(300)
@given(st.text(max_size=200))
@example("a: 2001-13-01")  # a date PyYAML cannot construct
@example("hostname: !!timestamp 2001-02-30")
@example("[" * 1000)  # nesting deeper than PyYAML's recursion
def test_arbitrary_text_is_a_policy_or_a_policy_error(text):
    loads_or_names_the_problem(text)


@fuzz_settings(400)
@given(yaml_documents())
def test_hostile_yaml_is_a_policy_or_a_policy_error(text):
    loads_or_names_the_problem(text)


@fuzz_settings(300)
@given(st.sampled_from(SECTIONS), st.one_of(st.sampled_from(SUBFIELDS), st.none()), json_values)
def test_published_documents_are_a_policy_or_a_policy_error(section, field, value):
    # What a component reads back from config.policy: JSON, validated like a file.
    document = dict(BASE)
    document[section] = {field: value} if field is not None else value
    try:
        from_document(document, "config.policy")
    except PolicyError:
        pass


@fuzz_settings(200)
@given(st.sampled_from(sorted(CHECKS)), st.dictionaries(st.sampled_from(SUBFIELDS) | st.text(max_size=8),
                                                         json_values, max_size=4))
def test_check_settings_are_a_policy_or_a_policy_error(check, settings):
    try:
        from_document({**BASE, "checks": {check: settings}}, "config.policy")
    except PolicyError:
        pass


# Regression: each of these escaped parse as another exception before the fuzzing above found it.
@pytest.mark.parametrize("text, line", [
    ("hostname: gw.example.com\nexpires: 2001-13-01\n", 2),  # ValueError: month must be in 1..12
    ("hostname: !!timestamp 2001-02-30\n", 1),  # ValueError: day is out of range for month
    ("[" * 1000, None),  # RecursionError
], ids=["impossible-date", "impossible-tagged-date", "deep-nesting"])
def test_texts_that_crashed_the_loader_are_policy_errors(text, line):
    with pytest.raises(PolicyError) as raised:
        parse(text, "p.yaml")
    assert raised.value.problems[0][0] == line
    assert "not valid YAML" in raised.value.problems[0][2]


def test_yaml_aliases_are_not_expanded_into_a_billion_laughs():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    with pytest.raises(PolicyError):
        parse(laughs + "hostname: x\nlocal_domains: *i\n")
    assert yaml.safe_load(laughs)  # references, not copies: cheap to load

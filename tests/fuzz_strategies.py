"""Hypothesis strategies and settings shared by the fuzz tests (tests/test_fuzz_*.py).

Every fuzz test runs under :data:`FUZZ`: a modest number of examples, a
deadline, and derandomized, so CI sees the same inputs on every run and a
failure reproduces from the test alone. ``BULWARK_FUZZ_EXAMPLES`` raises the
number of examples for a longer hunt on a workstation (a failure found that
way becomes an explicit ``@example`` or a regression test).
"""

from __future__ import annotations

import os
import types
import typing
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.events import EVENT_TYPES

EXAMPLES = int(os.environ.get("BULWARK_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(max_examples: int, deadline_ms: int = 2000) -> settings:
    return settings(
        max_examples=EXAMPLES or max_examples,
        deadline=timedelta(milliseconds=deadline_ms),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        print_blob=True,
    )


# -- JSON values, and text with what clients really send --------------------------

#: Text as aiosmtpd hands it over: any code point, lone surrogates included
#: (its surrogateescape decoding turns each byte that is not UTF-8 into one).
wild_text = st.text(st.characters(codec="utf-8") | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
                    max_size=40)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)

aware_datetimes = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
)


# -- events, built from their pydantic declarations -----------------------------------


def _for_annotation(annotation: Any, metadata: list) -> st.SearchStrategy:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        # The field's constraints (min_length, pattern...) bind each arm: an
        # optional list of at least one item is None or a list of one or more.
        return st.one_of(*(_for_annotation(a, metadata) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is typing.Annotated:
        return _for_annotation(args[0], list(args[1:]))
    if origin is list:
        min_size = next((m.min_length for m in metadata if getattr(m, "min_length", None) is not None), 0)
        return st.lists(_for_annotation(args[0], []), min_size=min_size, max_size=4)
    if origin is dict or annotation is dict:
        values = _for_annotation(args[1], []) if args else json_values
        return st.dictionaries(st.text(max_size=10), values, max_size=4)
    if annotation is type(None):
        return st.none()
    if annotation is str:
        pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
        return st.from_regex(pattern, fullmatch=True) if pattern else wild_text
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = next((m.ge for m in metadata if getattr(m, "ge", None) is not None), -(2**63))
        high = next((m.le for m in metadata if getattr(m, "le", None) is not None), 2**63 - 1)
        return st.integers(low, high)
    if annotation is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if annotation is datetime:
        return aware_datetimes
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_instances(annotation)
    raise NotImplementedError(f"no strategy for {annotation!r}")


def model_instances(model: type[BaseModel]) -> st.SearchStrategy:
    fields = {
        name: _for_annotation(info.annotation, info.metadata)
        for name, info in model.model_fields.items()
        if name not in ("type", "version")
    }
    return st.builds(model, **fields)


#: Every event type, with every field drawn from its declared type.
events = st.sampled_from(sorted(EVENT_TYPES)).flatmap(lambda name: model_instances(EVENT_TYPES[name]))

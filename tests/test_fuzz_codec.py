"""Fuzzing the event codec: whatever a topic holds, decode names the problem.

Every consumer (the Faust agents, the sinks, ingest's verdict waiter, the
state views) skips an unreadable record by catching ``UnknownEvent`` and
``ValueError``. Any other exception out of ``decode`` stops that consumer on
one bad record, so the property is: ``decode`` raises ``UnknownEvent`` or a
pydantic ``ValidationError`` (both ``ValueError``), never anything else.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import codec
from schemas.events import EVENT_TYPES

from .fuzz_strategies import events, fuzz_settings, json_values

header_names = st.sampled_from([codec.HEADER_TYPE, codec.HEADER_VERSION, codec.HEADER_EVENT_ID, "other"])
headers = st.lists(st.tuples(header_names, st.binary(max_size=20)), max_size=4)

#: (type, version) pairs the upcasters read, and the current ones.
VERSIONS = sorted({*codec.UPCASTERS, *((name, cls.VERSION) for name, cls in EVENT_TYPES.items())})


def decodes_or_names_the_problem(value: bytes, hdrs) -> None:
    try:
        codec.decode(value, hdrs)
    except (codec.UnknownEvent, ValidationError):
        pass


@fuzz_settings(300)
@given(st.binary(max_size=200), headers)
@example(b"[" * 5000, [])  # nesting deeper than the JSON parser's recursion
@example(b'{"type": "session.ehlo"}', [(codec.HEADER_TYPE, b"\xff")])  # a header that is not UTF-8
def test_arbitrary_bytes_are_refused_by_name(value, hdrs):
    decodes_or_names_the_problem(value, hdrs)


@fuzz_settings(300)
@given(json_values, headers)
@example({"type": ["session.rset"]}, [])  # a type that cannot be a dictionary key
@example({"type": {}, "version": 1}, [])
def test_arbitrary_json_is_refused_by_name(data, hdrs):
    decodes_or_names_the_problem(json.dumps(data).encode(), hdrs)


@fuzz_settings(400)
@given(st.sampled_from(VERSIONS), st.dictionaries(st.text(max_size=12), json_values, max_size=8), headers)
@example(("message.received", 1), {}, [])  # a v1 record missing the fields its upcaster moves
@example(("message.received", 1), {"mail_from": "a", "recipients": [], "digest": "", "size": 1,
                                   "client_ip": "x"}, [])  # ... and one without occurred_at
@example(("delivery.attempted", 1), {"tls": 5}, [])
def test_known_types_with_arbitrary_fields_are_refused_by_name(type_version, fields, hdrs):
    name, version = type_version
    decodes_or_names_the_problem(json.dumps({**fields, "type": name, "version": version}).encode(), hdrs)


@fuzz_settings(300)
@given(events, st.data())
def test_a_valid_event_survives_mutation_of_one_field(event, data):
    # A record one field away from valid is the likeliest corruption (or
    # a consumer reading a newer producer's record).
    body = json.loads(codec.encode(event)[0])
    key = data.draw(st.sampled_from(sorted(body)))
    mutated = dict(body)
    if data.draw(st.booleans()):
        del mutated[key]
    else:
        mutated[key] = data.draw(json_values)
    decodes_or_names_the_problem(json.dumps(mutated).encode(), [])


@fuzz_settings(300)
@given(events)
def test_every_event_round_trips_through_the_wire(event):
    value, hdrs = codec.encode(event)
    json.loads(value.decode("utf-8"))  # RFC 8259 JSON, in UTF-8 whatever the event's text
    decoded = codec.decode(value, hdrs)
    assert decoded == event
    assert codec.header(hdrs, codec.HEADER_TYPE) == event.TYPE
    assert codec.encode(decoded)[0] == value


# Regression: each of these escaped decode as another exception before the fuzzing above found it.
@pytest.mark.parametrize("value, hdrs", [
    (b"[" * 5000, []),  # RecursionError
    (b'{"type": "session.ehlo"}', [(codec.HEADER_TYPE, b"\xff")]),  # UnicodeDecodeError
    (b'{"type": ["session.rset"]}', []),  # TypeError: unhashable type
    (b'{"type": "message.received", "version": 1}', []),  # KeyError in the v1 upcaster
    (b'{"type": "message.received", "version": []}', []),  # TypeError: unhashable version
])
def test_records_that_crashed_decode_are_unknown_events(value, hdrs):
    with pytest.raises(codec.UnknownEvent):
        codec.decode(value, hdrs)

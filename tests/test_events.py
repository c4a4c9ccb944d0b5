"""Events: immutable, typed, versioned; old versions upcast; schemas current."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from schemas import codec
from schemas import events as ev
from schemas.jsonschema import JSON_DIR, render, stale
from schemas.topics import ALL_TOPICS, BY_NAME, record_key, topic_for

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def _envelope(**overrides) -> ev.Envelope:
    fields = dict(mail_from="a@partner.test", rcpt_to=["b@example.test"], sha256="ab" * 32, size=10,
                  client_ip="192.0.2.1", received_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    return ev.Envelope(**{**fields, **overrides})


def test_events_are_immutable_and_carry_type_version_and_ids():
    event = ev.SessionRcpt(session_id="s1", client_ip="192.0.2.1", recipient="b@example.test",
                           accepted=False, reply_code=554, reason="relay denied")
    assert (event.type, event.version) == ("session.rcpt", 1)
    assert event.event_id and event.occurred_at.tzinfo is not None
    with pytest.raises(ValidationError):
        event.accepted = True  # type: ignore[misc]


def test_an_event_cannot_claim_another_type():
    with pytest.raises(ValidationError, match="is session.rset v1"):
        ev.SessionRset(type="session.rcpt", client_ip="192.0.2.1")


def test_naive_timestamps_are_refused():
    with pytest.raises(ValidationError, match="time zone"):
        ev.SessionRset(client_ip="192.0.2.1", occurred_at=datetime(2026, 1, 1))


def test_wire_round_trip_with_type_and_version_in_headers():
    event = ev.MessageReceived(message_id="m1", session_id="s1", envelope=_envelope(), direction="inbound")
    value, headers = codec.encode(event)
    assert dict(headers)[codec.HEADER_TYPE] == b"message.received"
    assert dict(headers)[codec.HEADER_VERSION] == b"2"
    assert codec.decode(value, headers) == event


def test_a_header_that_disagrees_with_the_body_is_refused():
    value, _ = codec.encode(ev.SessionRset(client_ip="192.0.2.1"))
    with pytest.raises(codec.UnknownEvent, match="disagree"):
        codec.decode(value, [(codec.HEADER_TYPE, b"session.rcpt")])


def test_unknown_and_garbage_records_are_named_errors():
    with pytest.raises(codec.UnknownEvent, match="unknown event type"):
        codec.decode(b'{"type": "nope", "version": 1}')
    with pytest.raises(codec.UnknownEvent, match="not JSON"):
        codec.decode(b"\xff\x00")


def test_a_v1_message_received_is_upcast_to_the_current_version():
    raw = (FIXTURES / "message.received.v1.json").read_bytes()
    event = codec.decode(raw, [(codec.HEADER_TYPE, b"message.received"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(event, ev.MessageReceived) and event.version == 2
    assert event.envelope.rcpt_to == ["bob@example.com", "carol@example.com"]
    assert event.envelope.sha256 == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert event.envelope.received_at == event.occurred_at
    assert event.direction == "inbound"
    assert event.header_message_id == "<v1@partner.test>"


def test_a_version_from_the_future_is_not_guessed_at():
    data = json.loads((FIXTURES / "message.received.v1.json").read_text())
    data["version"] = 9
    with pytest.raises(codec.UnknownEvent, match="no upcaster"):
        codec.decode(json.dumps(data).encode())


def test_generated_json_schemas_are_current():
    assert stale() == [], "run `make schemas` (bulwark schemas generate) and commit schemas/json/"


def test_every_event_validates_against_its_published_json_schema():
    event = ev.Verdict(message_id="m1", action="quarantine", reasons=["ATTACHMENT_TYPE_BLOCKED"],
                       results=[ev.CheckResult(check="attachment_type", name="ATTACHMENT_TYPE_BLOCKED",
                                               outcome="hit", evidence=["x.exe"])],
                       policy_version="abc", envelope=_envelope(), direction="inbound")
    schema = json.loads((JSON_DIR / "message.verdict.v2.json").read_text())
    jsonschema.validate(json.loads(codec.encode(event)[0]), schema)
    other = json.loads(codec.encode(ev.SessionRset(client_ip="192.0.2.1"))[0])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(other, schema)


def test_every_event_type_has_exactly_one_topic_and_a_schema_file():
    files = render()
    for cls in ev.EVENT_TYPES.values():
        assert f"{cls.TYPE}.v{cls.VERSION}.json" in files
        assert [t.name for t in ALL_TOPICS if cls in t.carries] == [topic_for(cls).name]


def test_state_topics_are_compacted_and_audit_topics_keep_everything():
    assert BY_NAME["smtp.sessions"].topic_config(-1) == {"cleanup.policy": "delete", "retention.ms": "-1"}
    for name in ("config.policy", "directory.accounts", "accounts.state", "screening.bans"):
        assert BY_NAME[name].topic_config(-1)["cleanup.policy"] == "compact"


def test_records_are_keyed_as_their_topic_declares():
    session = ev.SessionRset(client_ip="192.0.2.7", session_id="s")
    assert record_key(topic_for(ev.SessionRset), session) == b"192.0.2.7"
    received = ev.MessageReceived(message_id="m9", envelope=_envelope(), direction="inbound")
    assert record_key(topic_for(ev.MessageReceived), received) == b"m9"


def test_a_v1_session_refused_is_upcast_with_no_argument():
    raw = (FIXTURES / "session.refused.v1.json").read_bytes()
    event = codec.decode(raw, [(codec.HEADER_TYPE, b"session.refused"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(event, ev.SessionRefused) and event.version == 2
    assert (event.phase, event.reply_code, event.argument) == ("connect", 421, None)


def test_a_v1_delivery_attempt_is_upcast_with_an_unvalidated_opportunistic_tls():
    raw = (FIXTURES / "delivery.attempted.v1.json").read_bytes()
    event = codec.decode(raw, [(codec.HEADER_TYPE, b"delivery.attempted"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(event, ev.DeliveryAttempted) and event.version == 2
    assert (event.tls.policy, event.tls.version, event.tls.verified) == ("opportunistic", "TLSv1.3", False)
    assert event.recipients[0].outcome == "delivered" and event.destination is None


def test_a_v1_verdict_is_upcast_with_no_authentication_results():
    raw = (FIXTURES / "message.verdict.v1.json").read_bytes()
    event = codec.decode(raw, [(codec.HEADER_TYPE, b"message.verdict"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(event, ev.Verdict) and event.version == 2
    assert (event.action, event.reasons, event.authentication_results) == (
        "quarantine", ["ATTACHMENT_TYPE_BLOCKED"], None)
    assert event.results[1].version == "ClamAV 1.4.3/27830" and event.envelope.client_helo == "mail.partner.test"


def test_bytes_that_are_not_utf8_are_recorded_escaped_not_lost():
    # aiosmtpd hands over an 8-bit byte as a lone surrogate (surrogateescape);
    # before this, the event could not be serialised and was never published.
    sent = b"victim\xff@elsewhere.test".decode("utf-8", "surrogateescape")
    event = ev.SessionRcpt(client_ip="192.0.2.1", recipient=sent, accepted=False, reply_code=501)
    value, headers = codec.encode(event)
    assert json.loads(value)["recipient"] == "victim\\xff@elsewhere.test"
    assert codec.decode(value, headers).recipient == "victim\\xff@elsewhere.test"
    # Everywhere in an event: nested parts, lists and mappings too.
    mail = ev.SessionMail(client_ip="192.0.2.1", sender="a@b.test", accepted=True, reply_code=250,
                          parameters={"X" + "\udcfe": "\udcaa"})
    assert json.loads(codec.encode(mail)[0])["parameters"] == {"X\\xfe": "\\xaa"}
    received = ev.MessageReceived(message_id="m1", direction="inbound",
                                  envelope=_envelope(rcpt_to=["b\udce9@example.test"], client_helo="h\udcff"))
    data = json.loads(codec.encode(received)[0])
    assert data["envelope"]["rcpt_to"] == ["b\\xe9@example.test"] and data["envelope"]["client_helo"] == "h\\xff"
    # Valid UTF-8 (SMTPUTF8, RFC 6531) is kept as it is.
    utf8 = ev.SessionRcpt(client_ip="192.0.2.1", recipient="jürgen@example.test", accepted=True, reply_code=250)
    assert json.loads(codec.encode(utf8)[0])["recipient"] == "jürgen@example.test"


def test_bulwarks_producers_partition_keys_as_faust_and_java_do():
    # ingest (librdkafka) and the Faust workers (aiokafka) write co-partitioned
    # topics: one key must land on one partition whoever writes it.
    from aiokafka.partitioner import DefaultPartitioner

    # The same partition as aiokafka's (the Java client's murmur2) for every key.
    for key in (b"192.0.2.7", b"01a2206d3ad2e39f51b26026c7cc", b"alice@example.test", b"203.0.113.9"):
        partition, count = _librdkafka_partition(key)
        partitions = list(range(count))
        assert DefaultPartitioner()(key, partitions, partitions) == partition


def _librdkafka_partition(key: bytes) -> tuple[int, int]:
    """(partition, partition count) where a producer configured as Bulwark's puts ``key``."""
    import confluent_kafka

    from bulwark.kafka import producer_config
    from bulwark.settings import Settings

    config = producer_config(Settings.from_env(), "t")
    # No broker needed: librdkafka's own mock cluster, which creates the topic.
    config.update({"bootstrap.servers": "", "test.mock.num.brokers": 1, "enable.idempotence": False,
                   "log_level": 3})
    producer = confluent_kafka.Producer(config)
    landed = []
    producer.produce("partitioning", key=key, value=b"x", on_delivery=lambda err, msg: landed.append(msg.partition()))
    producer.flush(10)
    count = len(producer.list_topics("partitioning", timeout=5).topics["partitioning"].partitions)
    return landed[0], count


def test_a_v1_quarantine_release_is_upcast_to_the_envelopes_recipients():
    raw = (FIXTURES / "quarantine.released.v1.json").read_bytes()
    event = codec.decode(raw, [(codec.HEADER_TYPE, b"quarantine.released"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(event, ev.QuarantineReleased) and event.version == 3 and event.reason is None
    assert event.to is None and event.recipients == ["lee@example.test"] and event.by == "admin"


def test_a_quarantine_action_records_why_and_round_trips():
    envelope = ev.Envelope(mail_from="billing@partner.test", rcpt_to=["lee@example.test"], sha256="0" * 64, size=1,
                           client_ip="192.0.2.7", received_at=ev.utcnow())
    for event in (ev.QuarantineReleased(message_id="q1", envelope=envelope, by="desk-lee",
                                        reason="expected invoice; the sender confirmed by phone"),
                  ev.QuarantineDeleted(message_id="q1", by="ops", reason="phishing reported by the recipient")):
        value, headers = codec.encode(event)
        assert codec.decode(value, headers) == event
    # Who and why are required of every new release and deletion, and why is one line.
    with pytest.raises(ValidationError):
        ev.QuarantineDeleted(message_id="q1", by="ops")
    for bad in ("two\nlines", "", "x" * (ev.REASON_MAX + 1)):
        with pytest.raises(ValidationError):
            ev.QuarantineDeleted(message_id="q1", by="ops", reason=bad)
    assert ev.audit_reason("  expected\r\n invoice ") == "expected invoice"
    with pytest.raises(ValueError):
        ev.audit_reason(" \t\n")


def test_a_v2_release_and_a_v1_deletion_are_upcast_with_no_reason_recorded():
    raw = (FIXTURES / "quarantine.released.v2.json").read_bytes()
    released = codec.decode(raw, [(codec.HEADER_TYPE, b"quarantine.released"), (codec.HEADER_VERSION, b"2")])
    assert isinstance(released, ev.QuarantineReleased) and released.version == 3
    assert (released.by, released.to, released.reason) == ("desk-lee", ["audit@example.test"], None)
    raw = (FIXTURES / "quarantine.deleted.v1.json").read_bytes()
    deleted = codec.decode(raw, [(codec.HEADER_TYPE, b"quarantine.deleted"), (codec.HEADER_VERSION, b"1")])
    assert isinstance(deleted, ev.QuarantineDeleted) and deleted.version == 2
    assert (deleted.by, deleted.reason) == ("admin", None)
    from bulwark.trace import describe

    assert describe(deleted) == "deleted from quarantine by admin (no reason recorded)"


"""The trace index's entries and store: what a trace by id, address or account can find."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from bulwark import trace_index as ix
from schemas import codec
from schemas import events as ev
from schemas.topics import DELIVERIES, RECEIVED, SESSIONS, VERDICTS

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _envelope(**overrides) -> ev.Envelope:
    fields = dict(mail_from="Alice@Partner.test", rcpt_to=["bob@example.test"], sha256="ab" * 32, size=10,
                  client_ip="192.0.2.1", received_at=T0)
    return ev.Envelope(**{**fields, **overrides})


class Log:
    """Records as they would sit on the topics, with their offsets."""

    def __init__(self):
        self.records: list[tuple] = []
        self.next: dict[tuple[str, int], int] = {}

    def put(self, topic: str, event: ev.Event, partition: int = 0) -> tuple[str, int, int]:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        value, headers = codec.encode(event)
        key = (event.client_ip if topic == SESSIONS.name else event.message_id).encode()
        self.records.append((topic, partition, offset, key, value, headers, event.timestamp_ms))
        return topic, partition, offset

    def entries(self, records=None) -> ix.Entries:
        entries = ix.Entries()
        for record in records if records is not None else self.records:
            entries.add(*record)
        return entries


def _session(log: Log, session_id: str, ip: str, at: datetime, message_id: str | None = None) -> dict:
    where = {"connected": log.put(SESSIONS.name, ev.SessionConnected(
        session_id=session_id, client_ip=ip, occurred_at=at, client_port=1, server_port=25, listener="inbound"))}
    where["auth"] = log.put(SESSIONS.name, ev.SessionAuth(session_id=session_id, client_ip=ip, mechanism="PLAIN",
                                                          username="carol@example.test", outcome="success",
                                                          occurred_at=at + timedelta(seconds=1)))
    where["mail"] = log.put(SESSIONS.name, ev.SessionMail(
        session_id=session_id, client_ip=ip, sender="Alice@Partner.test", accepted=True, reply_code=250,
        occurred_at=at + timedelta(seconds=2)))
    if message_id:
        where["data"] = log.put(SESSIONS.name, ev.SessionData(
            session_id=session_id, client_ip=ip, message_id=message_id, accepted=True, reply_code=250, size=10,
            occurred_at=at + timedelta(seconds=3)))
        where["received"] = log.put(RECEIVED.name, ev.MessageReceived(
            message_id=message_id, session_id=session_id, envelope=_envelope(client_ip=ip), direction="inbound",
            occurred_at=at + timedelta(seconds=3)), partition=2)
        where["queued"] = log.put(DELIVERIES.name, ev.DeliveryQueued(
            message_id=message_id, recipients=["bob@example.test"], source="verdict",
            occurred_at=at + timedelta(seconds=5)), partition=2)
    return where


def test_a_message_and_its_session_are_found_by_their_ids(tmp_path):
    log = Log()
    where = _session(log, "s1", "192.0.2.1", T0, "m1")
    store = ix.IndexStore(tmp_path / "index")
    store.write(store.merged(log.entries()))

    assert store.locations(ix.message_key("m1")) == {where["received"], where["queued"]}
    assert store.locations(ix.session_key("s1")) == {where[k] for k in ("connected", "auth", "mail", "data")}
    assert store.locations(ix.message_key("nothing")) == set()


def test_records_indexed_twice_change_nothing_and_later_ones_add_up(tmp_path):
    """What an indexer restarted after a crash does: it reads a batch again, then goes on."""
    log = Log()
    _session(log, "s1", "192.0.2.1", T0, "m1")
    store = ix.IndexStore(tmp_path / "index")
    store.write(store.merged(log.entries(log.records[:2])))
    # Read again from an older position: what is already there changes nothing but the position.
    assert store.merged(log.entries(log.records[1:2])) == {ix.position_key(SESSIONS.name, 0): b"2"}

    store.write(store.merged(log.entries(log.records[1:])))
    assert store.locations(ix.session_key("s1")) == {r[:3] for r in log.records if r[0] == SESSIONS.name}
    assert len(store.locations(ix.session_key("s1"))) == 4
    assert store.locations(ix.message_key("m1")) == {r[:3] for r in log.records if r[0] != SESSIONS.name}
    assert store.positions() == {(SESSIONS.name, 0): 4, (RECEIVED.name, 2): 1, (DELIVERIES.name, 2): 1}


def test_sessions_from_an_address_in_a_time_range(tmp_path):
    log = Log()
    for n in range(5):
        _session(log, f"s{n}", "192.0.2.7", T0 + timedelta(hours=n))
    _session(log, "other", "192.0.2.8", T0 + timedelta(hours=2))
    store = ix.IndexStore(tmp_path / "index")
    store.write(store.merged(log.entries()))

    def ms(at):
        return int(at.timestamp() * 1000)

    found = [f[1] for f in store.range(ix.ip_prefix("192.0.2.7"), ms(T0 + timedelta(hours=1)),
                                       ms(T0 + timedelta(hours=3)))]
    assert found == ["s1", "s2", "s3"]
    assert [f[1] for f in store.range(ix.ip_prefix("192.0.2.7"), None, None)] == [f"s{n}" for n in range(5)]
    # 192.0.2.70 is not 192.0.2.7
    _session(log, "s70", "192.0.2.70", T0)
    store.write(store.merged(log.entries()))
    assert "s70" not in [f[1] for f in store.range(ix.ip_prefix("192.0.2.7"), None, None)]
    # The same range over records not yet in the store.
    assert [f[1] for f in ix.fact_range(log.entries().facts, ix.ip_prefix("192.0.2.7"),
                                        ms(T0 + timedelta(hours=4)), None)] == ["s4"]


def test_an_account_is_found_by_login_sender_and_recipient_whatever_its_case(tmp_path):
    log = Log()
    _session(log, "s1", "192.0.2.1", T0, "m1")
    store = ix.IndexStore(tmp_path / "index")
    store.write(store.merged(log.entries()))

    sender = list(store.range(ix.account_prefix("alice@partner.test"), None, None))
    assert {(kind, ident) for _, kind, ident in sender} == {("s", "s1"), ("m", "m1")}
    assert [(k, i) for _, k, i in store.range(ix.account_prefix("BOB@example.test"), None, None)] == [("m", "m1")]
    assert [(k, i) for _, k, i in store.range(ix.account_prefix("carol@example.test"), None, None)] == [("s", "s1")]


def test_a_record_that_is_not_an_event_is_skipped_and_passed(tmp_path):
    entries = ix.Entries()
    entries.add(SESSIONS.name, 0, 0, b"192.0.2.1", b"not json", [], 0)
    entries.add(VERDICTS.name, 1, 7, None, b"{}", [], 0)
    assert not entries.postings and not entries.facts
    assert entries.positions == {(SESSIONS.name, 0): 1, (VERDICTS.name, 1): 8}


def test_the_store_opens_read_only_beside_its_writer(tmp_path):
    log = Log()
    _session(log, "s1", "192.0.2.1", T0, "m1")
    writer = ix.IndexStore(tmp_path / "index")
    writer.write(writer.merged(log.entries()))
    reader = ix.IndexStore(tmp_path / "index", read_only=True)
    try:
        assert reader.locations(ix.message_key("m1")) == writer.locations(ix.message_key("m1"))
        assert not reader.empty()
    finally:
        reader.close()
        writer.close()

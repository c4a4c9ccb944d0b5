"""Trace through the index: a message's timeline, a client's and an account's sessions, a restarted indexer."""

from __future__ import annotations

import shutil
import signal
import time
from datetime import datetime, timezone

import pytest

from bulwark import trace_index as ix
from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, RECEIVED, SESSIONS, VERDICTS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

MESSAGE_TOPICS = [RECEIVED.name, VERDICTS.name, DELIVERIES.name, QUARANTINE.name]


def _delivered(gateway, queue_id: str) -> None:
    gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryAttempted), [DELIVERIES.name], keys={queue_id},
                         timeout=60, what=f"delivery of {queue_id}")


def _on_topics(gateway, queue_id: str, client_ip: str) -> tuple[set, set]:
    """Where a message's records and its session's records are, read from the topics themselves."""
    messages = {(r.topic, r.partition, r.offset) for r in gateway.records(MESSAGE_TOPICS, keys={queue_id})}
    [received] = gateway.records([RECEIVED.name], keys={queue_id})
    session = {(r.topic, r.partition, r.offset) for r in gateway.records([SESSIONS.name], keys={client_ip})
               if r.event.session_id == received.event.session_id}
    return messages, session


def _indexed(gateway, key: str) -> set:
    store = ix.IndexStore.open_read_only(gateway.settings)
    if store is None:  # not made yet
        return set()
    try:
        return store.locations(key)
    finally:
        store.close()


def _wait_indexed(gateway, queue_id: str, client_ip: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        messages, session = _on_topics(gateway, queue_id, client_ip)
        [received] = gateway.records([RECEIVED.name], keys={queue_id})
        if (_indexed(gateway, ix.message_key(queue_id)) == messages
                and _indexed(gateway, ix.session_key(received.event.session_id)) == session):
            return
        assert time.monotonic() < deadline, f"{queue_id} not indexed within {timeout:.0f}s"
        time.sleep(0.5)


def test_a_traced_message_shows_its_timeline_from_the_index(gateway):
    msg = gateway.message("trace-index@partner.test", [f"ti@{LOCAL_DOMAIN}"], "indexed trace")
    queue_id = gateway.send(msg, source_ip="127.0.11.1")
    _delivered(gateway, queue_id)
    # The indexer has every record of the message and of its session, and nothing else.
    _wait_indexed(gateway, queue_id, "127.0.11.1")

    result = gateway.cli("trace", queue_id)
    assert "scanned the topics" not in result.stderr
    kinds = [line.split()[3] for line in result.stdout.splitlines()]
    for expected in ["session.connected", "session.ehlo", "session.mail", "session.rcpt", "session.data",
                     "session.disconnected", "message.received", "message.verdict", "delivery.queued",
                     "delivery.attempted"]:
        assert expected in kinds, result.stdout
    assert kinds.index("session.connected") < kinds.index("message.received") < kinds.index("delivery.attempted")
    assert f"ti@{LOCAL_DOMAIN} delivered 250" in result.stdout


def test_trace_by_client_address_and_by_account_over_a_time_range(gateway):
    first = gateway.send(gateway.message("range-one@partner.test", [f"range@{LOCAL_DOMAIN}"], "range one"),
                         source_ip="127.0.11.2")
    _delivered(gateway, first)
    between = datetime.now(timezone.utc)
    time.sleep(0.2)
    second = gateway.send(gateway.message("range-two@partner.test", [f"range@{LOCAL_DOMAIN}"], "range two"),
                          source_ip="127.0.11.2")
    _delivered(gateway, second)
    _wait_indexed(gateway, second, "127.0.11.2")

    def trace(*args: str) -> tuple[str, str]:
        """The text and the JSON lines of one trace."""
        return gateway.cli("trace", *args).stdout, gateway.cli("trace", "--json", *args).stdout

    text, lines = trace("--client-ip", "127.0.11.2", "--since", "1h")
    assert text.count("== session ") == 2 and first in lines and second in lines
    text, lines = trace("--client-ip", "127.0.11.2", "--since", between.isoformat())
    assert text.count("== session ") == 1 and second in lines and first not in lines
    text, lines = trace("--client-ip", "127.0.11.2", "--until", between.isoformat())
    assert text.count("== session ") == 1 and first in lines and second not in lines

    # The recipient of both, as an account: each message once, with its session.
    account, lines = trace("--account", f"RANGE@{LOCAL_DOMAIN}")
    assert account.count("== message ") == 2 and account.count("session.connected") == 2
    assert first in lines and second in lines
    assert "MAIL FROM:<range-one@partner.test>" in account and "MAIL FROM:<range-two@partner.test>" in account
    sender = gateway.cli("trace", "--account", "range-one@partner.test", "--json").stdout
    assert first in sender and second not in sender

    nothing = gateway.cli("trace", "--client-ip", "127.0.11.2", "--until", "2001-01-01", check=False)
    assert nothing.returncode == 1 and "nothing on the topics for 127.0.11.2" in nothing.stderr


def test_the_indexer_killed_resumes_where_it_was_without_gaps(gateway):
    indexer = gateway.stack.procs["trace-index"]
    indexer.send_signal(signal.SIGKILL)
    indexer.wait(10)
    sent = []
    for n in range(3):
        queue_id = gateway.send(gateway.message(f"gap{n}@partner.test", [f"gap@{LOCAL_DOMAIN}"], f"gap {n}"),
                                source_ip="127.0.11.3")
        sent.append(queue_id)
    for queue_id in sent:
        _delivered(gateway, queue_id)

    # Meanwhile a trace is still whole: what the index lacks is read from the topics.
    behind = gateway.cli("trace", sent[0])
    assert "to catch up on: read from the topics" in behind.stderr
    assert "delivery.attempted" in behind.stdout and "session.connected" in behind.stdout

    gateway.stack.start("trace-index", ["sinks", "trace-index"])
    for queue_id in sent:
        _wait_indexed(gateway, queue_id, "127.0.11.3")
    store = ix.IndexStore.open_read_only(gateway.settings)
    try:
        # Every session from that address, once each, and the account's three messages.
        sessions = [f for f in store.range(ix.ip_prefix("127.0.11.3"), None, None)]
        assert len(sessions) == 3
        assert {f[2] for f in store.range(ix.account_prefix(f"gap@{LOCAL_DOMAIN}"), None, None)} == set(sent)
    finally:
        store.close()


def test_a_lost_index_store_is_rebuilt_from_its_changelog(gateway):
    before = gateway.send(gateway.message("lost-one@partner.test", [f"lost@{LOCAL_DOMAIN}"], "lost one"),
                          source_ip="127.0.11.4")
    _delivered(gateway, before)
    _wait_indexed(gateway, before, "127.0.11.4")
    indexer = gateway.stack.procs["trace-index"]
    indexer.send_signal(signal.SIGKILL)
    indexer.wait(10)
    shutil.rmtree(ix.store_path(gateway.settings))

    # No index: a trace scans the topics, says so, and finds the same.
    scanned = gateway.cli("trace", before)
    assert "no trace index" in scanned.stderr and "scanned the topics" in scanned.stderr
    assert "session.connected" in scanned.stdout and "delivery.attempted" in scanned.stdout
    by_ip = gateway.cli("trace", "--client-ip", "127.0.11.4", "--json")
    assert "scanned the topics" in by_ip.stderr and before in by_ip.stdout

    gateway.stack.start("trace-index", ["sinks", "trace-index"])
    after = gateway.send(gateway.message("lost-two@partner.test", [f"lost@{LOCAL_DOMAIN}"], "lost two"),
                         source_ip="127.0.11.4")
    _delivered(gateway, after)
    # Both, the one indexed before the store was lost and the one after, exactly where they are on the topics.
    _wait_indexed(gateway, before, "127.0.11.4")
    _wait_indexed(gateway, after, "127.0.11.4")
    assert "restored" in gateway.stack.log_tail("trace-index", 200)

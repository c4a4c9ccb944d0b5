"""Two verdicts for one message (a content stage that crashed between publishing and remembering)
never make it both delivered and quarantined: every sink acts on the first."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from schemas import events as ev
from sinks.first_verdict import FirstVerdicts
from sinks.quarantine import QuarantineSink
from sinks.store import JsonIndex
from tests.test_delivery_queue import Publisher, accepting_server, make_sink


def verdict(message_id: str, action: str, at: datetime | None = None) -> ev.Verdict:
    envelope = ev.Envelope(mail_from="a@partner.test", rcpt_to=["bob@example.test"], sha256="0" * 64, size=10,
                           client_ip="192.0.2.1", received_at=datetime.now(timezone.utc))
    return ev.Verdict(message_id=message_id, action=action, results=[], policy_version="p", direction="inbound",
                      envelope=envelope, **({"occurred_at": at} if at else {}))


def sinks(tmp_path):
    _, send = accepting_server()
    delivery = make_sink(tmp_path / "delivery", send)
    delivery.first_verdicts = FirstVerdicts(JsonIndex(tmp_path / "d-first"), timedelta(days=7))
    quarantine = QuarantineSink(Publisher(), JsonIndex(tmp_path / "q-index"),
                                FirstVerdicts(JsonIndex(tmp_path / "q-first"), timedelta(days=7)))
    return delivery, quarantine


@pytest.mark.parametrize("together", [False, True], ids=["two batches", "one batch"])
async def test_the_first_verdict_is_the_one_both_sinks_act_on(tmp_path, together):
    delivery, quarantine = sinks(tmp_path)
    first = [verdict("m1", "quarantine"), verdict("m2", "deliver")]
    second = [verdict("m1", "deliver"), verdict("m2", "quarantine")]  # judged again after a crash
    batches = [first + second] if together else [first, second]
    for batch in batches:  # each sink reads the topic in the same order
        await delivery.take(batch)
        await quarantine.take(batch)
    assert "m1" not in delivery.queue and quarantine.index.get("m1")["state"] == "quarantined"
    assert "m2" in delivery.queue and quarantine.index.get("m2") is None


async def test_the_same_verdict_read_again_is_still_acted_on_once(tmp_path):
    delivery, quarantine = sinks(tmp_path)
    held, sent = verdict("m3", "quarantine"), verdict("m4", "deliver")
    for _ in range(2):  # a redelivery after the offset was not committed
        await delivery.take([held, sent])
        await quarantine.take([held, sent])
    assert [e for e in quarantine.publisher.events if e[0] == "quarantine.added"] == [("quarantine.added", "m3")]
    assert "m4" in delivery.queue and "m3" not in delivery.queue


def test_first_verdicts_are_forgotten_after_the_retention(tmp_path):
    first = FirstVerdicts(JsonIndex(tmp_path / "first"), timedelta(days=7))
    old = datetime.now(timezone.utc) - timedelta(days=8)
    asyncio.run(first.admit([verdict("old", "deliver", at=old), verdict("new", "deliver")]))
    assert first.prune() == 1
    assert first.index.get("old") is None and first.index.get("new") is not None

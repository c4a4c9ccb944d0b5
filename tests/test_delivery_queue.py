"""The delivery sink's queue: each message sent once, each event published once,
whatever Kafka does meanwhile. The SMTP side is replaced by a recorder here;
tests/integration/test_exactly_once.py drives the real pipeline."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import datetime, timezone

import pytest

from bulwark.policy import Policy
from bulwark.settings import Settings
from schemas import events as ev
from sinks.delivery import DeliverySink
from sinks.store import JsonIndex


class Publisher:
    """Acknowledges after a random few milliseconds; refuses while ``down``."""

    def __init__(self):
        self.events: list[tuple[str, str | None]] = []
        self.down = False

    async def publish(self, event):
        await asyncio.sleep(random.random() * 0.01)
        if self.down:
            raise ConnectionError("broker unavailable")
        self.events.append((event.TYPE, event.message_id))


def make_sink(tmp_path, send) -> DeliverySink:
    settings = Settings.from_env().with_(blob_dir=tmp_path / "blobs", delivery_poll_seconds=0.05)
    policy = Policy.model_validate({
        "hostname": "gw.example.test", "local_domains": ["example.test"],
        "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
        "delivery": {"retry_schedule_seconds": [1, 2], "give_up_after_seconds": 30},
    })
    sink = DeliverySink(settings, policy, Publisher(), JsonIndex(tmp_path / "queue"))
    sink._send = send
    return sink


async def verdicts(sink: DeliverySink, rcpts: list[str]) -> list[ev.Verdict]:
    digest = await sink.blobs.put(b"Subject: hello\r\n\r\nHello.\r\n")
    return [ev.Verdict(message_id=f"m{i}", action="deliver", results=[], policy_version="p", direction="inbound",
                       envelope=ev.Envelope(mail_from="a@partner.test", rcpt_to=[rcpt], sha256=digest, size=20,
                                            client_ip="192.0.2.1", received_at=datetime.now(timezone.utc)))
            for i, rcpt in enumerate(rcpts)]


async def run_until(sink: DeliverySink, done, timeout: float = 10) -> None:
    task = asyncio.create_task(sink.scheduler())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # long enough for a second send or event to show
    finally:
        task.cancel()


def delivered(rcpts):
    return [ev.RecipientResult(recipient=r, outcome="delivered", reply_code=250) for r in rcpts], None


def accepting_server():
    """(the recipients sent to, in order; a send that accepts every recipient)."""
    sent: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        sent.extend(rcpts)
        return delivered(rcpts)

    return sent, send


@pytest.mark.asyncio
async def test_each_message_sent_once_and_announced_once_under_concurrent_batches(tmp_path):
    sent: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        await asyncio.sleep(random.random() * 0.01)
        sent.extend(rcpts)
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    batch = await verdicts(sink, [f"u{i}@example.test" for i in range(200)])

    async def consume():
        for i in range(0, len(batch), 7):
            await sink.take(batch[i:i + 7])
            await sink.take(batch[max(0, i - 7):i])  # the previous batch consumed again
    consumer = asyncio.create_task(consume())
    await run_until(sink, lambda: len(set(sent)) == 200)
    await consumer
    assert Counter(sent) == Counter({f"u{i}@example.test": 1 for i in range(200)})
    counts = Counter(sink.publisher.events)
    assert {n for n in counts.values()} == {1}
    assert sum(t == "delivery.attempted" for t, _ in counts) == 200
    # Announced before attempted, for every message.
    order = sink.publisher.events
    for i in range(200):
        assert order.index(("delivery.queued", f"m{i}")) < order.index(("delivery.attempted", f"m{i}"))


@pytest.mark.asyncio
async def test_a_broker_outage_after_the_remote_250_never_sends_again(tmp_path):
    sent: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        sent.extend(rcpts)
        sink.publisher.down = True  # Kafka goes away right after the remote server said 250
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    [verdict] = await verdicts(sink, ["carol@example.test"])
    await sink.take([verdict])
    task = asyncio.create_task(sink.scheduler())
    try:
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # past the first retry (1 s): a re-send would have happened
        assert sent == ["carol@example.test"]
        assert ("delivery.attempted", "m0") not in sink.publisher.events
        sink.publisher.down = False  # back: the recorded attempt is published, once
        for _ in range(100):
            if ("delivery.attempted", "m0") in sink.publisher.events:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
    assert sent == ["carol@example.test"]
    assert sink.publisher.events.count(("delivery.attempted", "m0")) == 1
    assert sink.queue.get("m0")["done"] and sink.queue.get("m0")["outbox"] == []


@pytest.mark.asyncio
async def test_a_deferred_recipient_is_retried_and_each_attempt_recorded_once(tmp_path):
    tries: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        tries.extend(rcpts)
        if len(tries) == 1:
            return [ev.RecipientResult(recipient=r, outcome="deferred", reply_code=451, reply="later")
                    for r in rcpts], None
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    await sink.take(await verdicts(sink, ["dave@example.test"]))
    await run_until(sink, lambda: len(tries) == 2, timeout=5)
    assert tries == ["dave@example.test"] * 2
    assert [t for t, _ in sink.publisher.events] == ["delivery.queued", "delivery.attempted", "delivery.attempted"]


@pytest.mark.asyncio
async def test_after_a_restart_only_unfinished_entries_are_delivered(tmp_path):
    sent, send = accepting_server()

    sink = make_sink(tmp_path, send)
    batch = await verdicts(sink, ["a1@example.test", "a2@example.test"])
    await sink.take(batch[:1])
    await run_until(sink, lambda: sent == ["a1@example.test"])
    await sink.take(batch[1:])  # queued and announced, never delivered: the sink stops
    sink.queue.close()

    again = make_sink(tmp_path, send)  # the same queue, as after a restart
    await run_until(again, lambda: len(sent) == 2)
    assert sent == ["a1@example.test", "a2@example.test"]  # a1 once, before the restart; a2 once, after


@pytest.mark.asyncio
async def test_finished_deliveries_are_forgotten_after_the_retention_and_old_verdicts_not_acted_on(tmp_path):
    from datetime import timedelta

    sent, send = accepting_server()

    sink = make_sink(tmp_path, send)
    old, recent, waiting = await verdicts(sink, ["old@example.test", "new@example.test", "later@example.test"])
    await sink.take([old, recent])
    await run_until(sink, lambda: len(sent) == 2)
    # One delivered long ago (as the queue records it), one still waiting for its retry.
    long_ago = (datetime.now(timezone.utc) - sink.retention - timedelta(hours=1)).isoformat()
    entry = sink.queue.get("m0")
    entry["first_queued_at"] = long_ago
    sink.queue.put("m0", entry)
    pending = sink._entry("m2", None, "verdict", waiting.envelope, ["later@example.test"])
    pending.update(first_queued_at=long_ago, next_attempt_at=(datetime.now(timezone.utc) + timedelta(hours=1)).isoformat())
    sink.queue.put("m2", pending)

    assert await sink.prune() == 1
    assert sink.queue.get("m0") is None  # finished and past the retention: forgotten
    assert sink.queue.get("m1")["done"]  # finished recently: still remembered
    assert sink.queue.get("m2") is not None  # never forgotten while there is work left

    # The forgotten message's verdict read again (offsets expired, say): not delivered again.
    stale = old.model_copy(update={"occurred_at": datetime.now(timezone.utc) - sink.retention - timedelta(hours=1)})
    await sink.take([stale])
    await run_until(sink, lambda: False, timeout=1.5)
    assert sorted(sent) == ["new@example.test", "old@example.test"]


@pytest.mark.asyncio
async def test_a_release_to_another_address_goes_there_only_and_says_whom_it_was_for(tmp_path):
    sent: list[tuple[list[str], bytes]] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        sent.append((list(rcpts), bytes(data)))
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    [held, plain] = await verdicts(sink, ["lee@example.test", "kim@example.test"])
    await sink.take([
        ev.QuarantineReleased(message_id="m0", envelope=held.envelope, by="root", to=["audit@example.test"],
                              reason="for the audit mailbox"),
        ev.QuarantineReleased(message_id="m1", envelope=plain.envelope, by="root", reason="expected"),
    ])
    await run_until(sink, lambda: len(sent) == 2)
    by_rcpt = {tuple(rcpts): data for rcpts, data in sent}
    assert set(by_rcpt) == {("audit@example.test",), ("kim@example.test",)}
    assert b"X-Bulwark-Released-For: lee@example.test" in by_rcpt[("audit@example.test",)]
    assert b"X-Bulwark-Released-For" not in by_rcpt[("kim@example.test",)]

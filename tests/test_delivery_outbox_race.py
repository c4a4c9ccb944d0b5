"""The delivery sink's outbox and a retry of the same entry, interleaved.

A deferred attempt's event waits in the entry's outbox while the broker is
away. When the publish gives up before the retry is due (in production
after 30 s, twice the default request timeout, before a first retry a minute
or more later), the retry starts with that event still in the outbox, and
the broker may come back while the retry waits for a slow server: the
outbox is then published while the retry is in flight. Each attempt's
delivery.attempted must still be published once.

These need no broker: the publisher is a stand-in that refuses at once
while the broker is "down" (as a publish does once its timeout has passed)
and can be held mid-publish. tests/integration/test_delivery_outage.py
interrupts the real broker and sink.

Before the fix both failed: the retry's ``_settle`` wrote back the outbox as
it was when the retry became due, so an event already published was
published again; or, if the publish was under way then, ``_flush_outbox``
overwrote the outbox with its own copy and the retry's event was never
published.
"""

from __future__ import annotations

import asyncio

import pytest

from schemas import events as ev
from tests.test_delivery_queue import delivered, make_sink, verdicts


class Broker:
    """Keeps every event published; refuses while ``down``; holds each
    publish while ``gate`` is clear (``publishing`` says one is waiting)."""

    def __init__(self):
        self.events: list[ev.Event] = []
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.publishing = asyncio.Event()

    async def publish(self, event):
        await asyncio.sleep(0.001)
        if self.down:
            raise ConnectionError("broker unavailable")
        self.publishing.set()
        await self.gate.wait()
        self.events.append(event)

    def attempts(self) -> list[tuple[int, str]]:
        return [(e.attempt, e.recipients[0].outcome) for e in self.events if isinstance(e, ev.DeliveryAttempted)]


async def until(condition, timeout: float = 10) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("broker_back", ["before the retry ends", "while the retry ends"])
async def test_a_retry_overlapping_the_outbox_publish_publishes_each_attempt_once(tmp_path, broker_back):
    retry_started, server_answers = asyncio.Event(), asyncio.Event()
    tries: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        tries.extend(rcpts)
        if len(tries) == 1:
            broker.down = True  # gone as attempt 1 ends: its event stays in the outbox
            return [ev.RecipientResult(recipient=r, outcome="deferred", reply_code=451, reply="4.3.0 later")
                    for r in rcpts], None
        retry_started.set()
        await server_answers.wait()  # a slow server
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    sink.publisher = broker = Broker()
    await sink.take(await verdicts(sink, ["erin@example.test"]))
    scheduler = asyncio.create_task(sink.scheduler())
    try:
        await asyncio.wait_for(retry_started.wait(), 10)  # the retry, 1 s later
        assert len(sink.queue.get("m0")["outbox"]) == 1  # attempt 1's event, unpublished
        broker.down = False
        if broker_back == "before the retry ends":
            # The outbox is published while the retry waits for the server.
            assert await until(lambda: broker.attempts()), "attempt 1's event never published"
            server_answers.set()
        else:
            # The outbox is being published when the retry records its outcome.
            broker.gate.clear()
            broker.publishing.clear()
            await asyncio.wait_for(broker.publishing.wait(), 5)
            server_answers.set()
            assert await until(lambda: sink.queue.get("m0")["done"]), "the retry's outcome never recorded"
            broker.gate.set()
        await until(lambda: len(broker.attempts()) >= 2, timeout=5)  # (or not at all)
        await asyncio.sleep(0.5)  # long enough for a further publish to show
    finally:
        scheduler.cancel()
        broker.gate.set()
        await asyncio.gather(scheduler, return_exceptions=True)
    assert tries == ["erin@example.test"] * 2
    assert broker.attempts() == [(1, "deferred"), (2, "delivered")], \
        f"delivery.attempted published (attempt, outcome): {broker.attempts()}"
    assert sink.queue.get("m0")["outbox"] == []

"""The audit events' back-pressure: during a broker outage memory stays bounded and ingest says 421/451.

The publisher here is the real one (librdkafka) pointed at a port where no
broker listens, so nothing it emits is ever acknowledged: what a broker
outage looks like from ingest.
"""

from __future__ import annotations

import asyncio

from bulwark.kafka import EventPublisher, LoopProducer, producer_config
from bulwark.settings import Settings
from ingest.guards.backlog import CONNECT_REPLY, MAIL_REPLY, EventBacklogGuard
from schemas import events as ev
from tests.outbound_servers import free_port


async def test_unacknowledged_events_stop_new_work_then_are_dropped_never_held(caplog):
    settings = Settings.from_env().with_(kafka_bootstrap=f"127.0.0.1:{free_port()}", kafka_request_timeout_ms=60000)
    config = {**producer_config(settings, "test-backlog"), "log_level": 0}  # (its connection refusals: expected)
    publisher = EventPublisher(LoopProducer(config), backlog_limit=10)
    await publisher.start()
    guard = EventBacklogGuard(publisher)
    try:
        assert await guard.on_connect(None) is None and await guard.on_mail(None, "a@b.test", []) is None
        for i in range(9):
            publisher.emit(ev.SessionRset(client_ip="192.0.2.1", session_id=f"s{i}"))
        await asyncio.sleep(0.2)  # handed to librdkafka, which cannot deliver
        assert publisher.backlog == 9 and not publisher.backlogged
        publisher.emit(ev.SessionRset(client_ip="192.0.2.1", session_id="s9"))
        assert publisher.backlogged
        refusal = await guard.on_connect(None)
        assert refusal.reply == CONNECT_REPLY and refusal.close and "10 audit events" in refusal.reason
        assert (await guard.on_mail(None, "a@b.test", [])).reply == MAIL_REPLY
        # Sessions under way may still add events, up to twice the limit; beyond, dropped and counted.
        for i in range(15):
            publisher.emit(ev.SessionRset(client_ip="192.0.2.1", session_id=f"t{i}"))
        assert (publisher.backlog, publisher.dropped) == (20, 5)
        assert "audit events dropped" in caplog.text
    finally:
        publisher.producer._stopping.set()  # nothing to flush to: do not wait for the timeout


async def test_acknowledged_events_leave_the_backlog():
    # librdkafka's own mock cluster (it creates the topics) acknowledges like a broker.
    config = producer_config(Settings.from_env(), "test-backlog-acks")
    config.update({"bootstrap.servers": "", "test.mock.num.brokers": 1, "enable.idempotence": False, "log_level": 3})
    publisher = EventPublisher(LoopProducer(config), backlog_limit=10)
    await publisher.start()
    try:
        for i in range(25):  # more than twice the limit, over time: nothing dropped
            publisher.emit(ev.SessionRset(client_ip="192.0.2.1", session_id=f"s{i}"))
            if i % 5 == 4:
                for _ in range(100):
                    if publisher.backlog == 0:
                        break
                    await asyncio.sleep(0.05)
        assert (publisher.backlog, publisher.dropped, publisher.emit_failures) == (0, 0, 0)
        assert not publisher.backlogged
    finally:
        await publisher.stop()

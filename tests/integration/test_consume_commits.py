"""What the sinks' consumer (``bulwark.kafka.consume``) commits, on the real broker.

It commits at most once a second (one OffsetCommit per batch was a tenth of
the broker's requests), so what it commits when it stops, and what it never
commits, is what decides whether a sink restarted loses or repeats work:
a clean stop commits everything handled; a handler that failed leaves its
batch to be handled again.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bulwark.kafka import consume
from schemas import codec
from schemas import events as ev

pytestmark = pytest.mark.integration


async def _topic(settings) -> str:
    name = f"test.consume-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return name


async def _publish(settings, topic: str, n: int, first: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for i in range(first, first + n):
            value, headers = codec.encode(ev.SessionRset(client_ip=f"192.0.2.{i}"))
            await producer.send_and_wait(topic, value, headers=headers)
    finally:
        await producer.stop()


async def _committed(settings, topic: str, group: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


async def _run(settings, topic: str, group: str, until: int, fail: bool = False) -> list[str]:
    """Consume until ``until`` events were handled (then stop it, as a signal does), or fail on the first batch."""
    seen: list[str] = []
    enough = asyncio.Event()

    async def handle(events):
        if fail:
            raise RuntimeError("the handler broke")
        seen.extend(e.client_ip for e in events)
        if len(seen) >= until:
            enough.set()

    task = asyncio.create_task(consume(settings, group, [topic], handle))
    waiter = asyncio.create_task(enough.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        task.result()  # raises the handler's error
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen


def test_a_clean_stop_commits_what_was_handled_and_a_failed_batch_is_handled_again(gateway):
    settings = gateway.settings

    async def scenario():
        topic, group = await _topic(settings), f"test-consume-{uuid.uuid4().hex[:8]}"
        await _publish(settings, topic, 5, first=1)
        # Stopped within the second after handling: nothing would have been committed yet but for the stop.
        assert await _run(settings, topic, group, until=5) == [f"192.0.2.{i}" for i in range(1, 6)]
        assert await _committed(settings, topic, group) == 5

        await _publish(settings, topic, 3, first=6)
        with pytest.raises(RuntimeError, match="the handler broke"):
            await _run(settings, topic, group, until=3, fail=True)
        assert await _committed(settings, topic, group) == 5  # the failed batch is not committed

        # Restarted: the three again, and not the five before them.
        assert await _run(settings, topic, group, until=3) == ["192.0.2.6", "192.0.2.7", "192.0.2.8"]
        assert await _committed(settings, topic, group) == 8

    asyncio.run(scenario())

"""The workers' consumer group has an offset on every partition it consumes before any worker starts.

A Faust worker given a partition with no committed offset was seen to begin
at the partition's end (bench/chaos.py: messages answered 250 that no worker
ever judged). `bulwark topics ensure`, run before the workers, commits each
partition's first offset for the group; a worker's own commits move them on.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.topics import ACCOUNT_STATE, BANS, OUTBREAK_FINGERPRINTS, RECEIVED, SESSIONS

pytestmark = pytest.mark.integration


async def _committed(settings, specs) -> dict[TopicPartition, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id="bulwark-streams",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(spec.name, p) for spec in specs for p in range(spec.partitions)]
        return {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


def test_every_partition_the_workers_consume_has_a_committed_offset(gateway):
    committed = asyncio.run(_committed(gateway.settings, [RECEIVED, SESSIONS, ACCOUNT_STATE, BANS,
                                                          OUTBREAK_FINGERPRINTS]))
    # Partitions no record ever reached included (most of accounts.state and screening.bans here).
    assert [tp for tp, offset in committed.items() if offset is None] == []

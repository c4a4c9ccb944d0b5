"""Inline refusal: waiting, at the end of DATA, for the content stage's verdict.

When a check's action is "refuse" (an infected attachment, say), the client
should hear 550 while it is still connected, rather than the message being
accepted and quarantined. Ingest records the message as usual (blob +
``message.received``), then waits up to the policy's deadline for the verdict
on ``mail.verdicts``. A ``reject`` verdict in time is answered 550 and
recorded as ``message.refused``; anything else, or no verdict in time, is
answered 250 — a late ``reject`` is then quarantined by the quarantine sink,
so nothing accepted is ever lost and the client never waits long.

Every ingest node follows the whole verdict topic from its end (no consumer
group: each node needs the verdicts of its own sessions, wherever they land).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from bulwark.kafka_security import aiokafka_options
from bulwark.settings import Settings
from schemas import codec
from schemas.events import Verdict
from schemas.topics import VERDICTS

log = logging.getLogger(__name__)


class VerdictWaiter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._waiting: dict[str, asyncio.Future] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id="bulwark-ingest-verdicts",
            **aiokafka_options(self.settings),
        )
        await self._consumer.start()
        partitions = [TopicPartition(VERDICTS.name, p) for p in range(VERDICTS.partitions)]
        self._consumer.assign(partitions)
        # Only verdicts from now on matter: the sessions waiting are new.
        await self._consumer.seek_to_end(*partitions)
        self._task = asyncio.create_task(self._follow(), name="verdict-waiter")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._consumer:
            await self._consumer.stop()

    def expect(self, message_id: str) -> asyncio.Future:
        """Register interest before the message is recorded, so no verdict is missed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        return future

    def forget(self, message_id: str) -> None:
        future = self._waiting.pop(message_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def wait(self, message_id: str, future: asyncio.Future, deadline: float) -> Verdict | None:
        """The verdict, or None if it did not come within ``deadline`` seconds."""
        try:
            return await asyncio.wait_for(future, deadline)
        except asyncio.TimeoutError:
            return None
        finally:
            self._waiting.pop(message_id, None)

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except Exception:
                log.exception("reading %s failed; retrying", VERDICTS.name)
                await asyncio.sleep(1)
                continue
            for records in batch.values():
                for record in records:
                    future = self._waiting.get(record.key.decode()) if record.key else None
                    if future is None or future.done():
                        continue
                    try:
                        event = codec.decode(record.value, record.headers)
                    except (codec.UnknownEvent, ValueError):
                        continue
                    if isinstance(event, Verdict):
                        future.set_result(event)

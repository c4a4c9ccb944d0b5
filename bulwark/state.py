"""In-memory views of compacted state topics (bans, accounts, policy, directory).

Ingest decides during the SMTP dialogue from local memory only, so no reply
waits on a remote query. Each view reads its compacted topic from the
beginning (no consumer group: every ingest node keeps the whole state) and
then follows it. The latest event per key is the state; a tombstone (a
record with no value) removes the key.

    view = StateView(settings, BANS, key=lambda e: e.client_ip)
    await view.start()          # returns once the topic has been read to its end
    view.get("192.0.2.1")       # the latest event for that key, or None
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from bulwark.kafka import BROKER_RETRY_SECONDS
from bulwark.kafka_security import aiokafka_options
from bulwark.settings import Settings
from schemas import codec
from schemas.events import Event
from schemas.topics import TopicSpec

log = logging.getLogger(__name__)

#: How long the broker may hold a view's fetch when there is nothing new.
#: A state topic changes rarely, and a fetch is answered as soon as a record
#: is appended (none of these topics is written in transactions, whose
#: commits do not wake a fetch: streams/transport.py), so waiting longer
#: costs no freshness; it only saves the idle round trips. At aiokafka's
#: 500 ms default the eleven views of a stack asked the broker about 40 times
#: a second with nothing to say (docs/performance.md, "Seventh session").
FETCH_MAX_WAIT_MS = 5000

Listener = Callable[[str, Event | None], None]


class StateView:
    def __init__(self, settings: Settings, spec: TopicSpec, isolation_level: str = "read_committed"):
        self.settings = settings
        self.spec = spec
        self.isolation_level = isolation_level
        self.state: dict[str, Event] = {}
        self._listeners: list[Listener] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self.caught_up = asyncio.Event()

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(key, event_or_None)`` for every change after start-up too."""
        self._listeners.append(listener)

    def get(self, key: str) -> Event | None:
        return self.state.get(key)

    def items(self):
        return self.state.items()

    async def start(self, timeout: float = 60) -> None:
        """Read the topic to its end. A broker that does not answer yet is waited
        for, as ``start_publisher`` does: a component started (or restarted by
        its service manager) during a broker outage comes up when the broker
        does, instead of exiting and crash-looping until its manager gives up.
        ``timeout`` counts from the moment the broker answered."""
        while True:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level=self.isolation_level,
                client_id=f"bulwark-view-{self.spec.name}",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                **aiokafka_options(self.settings),
            )
            partitions = [TopicPartition(self.spec.name, p) for p in range(self.spec.partitions)]
            try:
                await self._consumer.start()
                self._consumer.assign(partitions)
                await self._consumer.seek_to_beginning(*partitions)
                ends = await self._consumer.end_offsets(partitions)
                break
            except (KafkaConnectionError, KafkaTimeoutError) as exc:  # gone before we had the offsets, too
                await self._consumer.stop()
                log.warning("waiting for Kafka at %s to read %s: %s", self.settings.kafka_bootstrap,
                            self.spec.name, exc)
                await asyncio.sleep(BROKER_RETRY_SECONDS)
        self._task = asyncio.create_task(self._follow(ends), name=f"view-{self.spec.name}")
        await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._consumer:
            await self._consumer.stop()

    def _apply(self, key: str, value: bytes | None, headers) -> None:
        if value is None:
            event = None
            self.state.pop(key, None)
        else:
            try:
                event = codec.decode(value, headers)
            except (codec.UnknownEvent, ValueError) as exc:
                log.error("skipping a record on %s: %s", self.spec.name, exc)
                return
            self.state[key] = event
        for listener in self._listeners:
            listener(key, event)

    async def _follow(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        pending = {tp for tp, end in ends.items() if end > 0}
        if not pending:
            self.caught_up.set()
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except Exception:
                log.exception("reading %s failed; retrying", self.spec.name)
                await asyncio.sleep(1)
                continue
            for tp, records in batch.items():
                for record in records:
                    self._apply(record.key.decode() if record.key else "", record.value, record.headers)
            if pending:
                for tp in list(pending):
                    if await self._consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
                if not pending:
                    self.caught_up.set()

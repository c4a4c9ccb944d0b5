"""Producing, reading and creating Bulwark's topics.

Producers are confluent-kafka's (librdkafka: batching, retries, idempotence
and transactions in C), consumers and the admin client aiokafka's. Faust
keeps its own aiokafka client. Why, with the figures: docs/operations.md, "Kafka clients".

Every event goes to the topic that declares it, keyed as that topic says, with
the record timestamp set to the event's own time (so Faust windows run in
event time and a replay gives the same answer).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import confluent_kafka
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (CommitFailedError, IllegalGenerationError, KafkaConnectionError, TopicAlreadyExistsError,
                             UnknownMemberIdError)

from bulwark import metrics
from bulwark.kafka_security import aiokafka_options, librdkafka_config
from bulwark.settings import Settings
from schemas import codec
from schemas.events import Event
from schemas.topics import ALL_TOPICS, BY_NAME, TopicSpec, record_key, topic_for

log = logging.getLogger(__name__)


def producer_config(settings: Settings, client_id: str, **extra) -> dict:
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        # A few milliseconds of linger lets concurrent sessions share one
        # produce request instead of each paying for its own round trip.
        "linger.ms": 5,
        "request.timeout.ms": settings.kafka_request_timeout_ms,
        # How long librdkafka keeps trying before a delivery is reported failed.
        "message.timeout.ms": 2 * settings.kafka_request_timeout_ms,
        # The Java client's (and aiokafka's, so Faust's) key -> partition
        # mapping. librdkafka's default (CRC32) would put one key on two
        # partitions depending on who wrote it, and co-partitioned topics
        # (smtp.sessions and screening.bans, keyed by IP) would disagree.
        "partitioner": "murmur2_random",
        **librdkafka_config(settings),
        **extra,
    }


def assigned_reader_config(settings: Settings, client_id: str, **extra) -> dict:
    """A librdkafka consumer in no group: it reads the partitions it is assigned, where it is told,
    and commits nothing, so it disturbs no one (trace, replay)."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": client_id,  # required by librdkafka; never joined (assign only) nor committed
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        **librdkafka_config(settings),
        **extra,
    }


def consumer_config(settings: Settings, group_id: str, **extra) -> dict:
    """A librdkafka consumer in a group that commits only the offsets its owner says are done."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "client.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Never see an aborted transaction (a 451ed message's mail.received).
        "isolation.level": "read_committed",
        **librdkafka_config(settings),
        **extra,
    }


class LoopProducer:
    """A librdkafka producer whose delivery reports resolve asyncio futures.

    ``produce`` never blocks: librdkafka queues, batches and sends in its own
    threads; its delivery reports are served by ``poll`` on a thread of ours
    and handed to the event loop. (confluent_kafka.aio.AIOProducer batches a
    second time in Python and flushes on a timer, adding latency to every
    reply that waits for an acknowledgement.)
    """

    def __init__(self, config: dict):
        self.config = config
        self._producer: confluent_kafka.Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = confluent_kafka.Producer(self.config)
        self._poller = threading.Thread(target=self._poll, name=f"{self.config['client.id']}-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.05)

    async def send(self, topic: str, value: bytes, key: bytes | None, headers, timestamp_ms: int) -> asyncio.Future:
        """Queue a record; the returned future resolves when the broker has it (acks=all)."""
        future = self._loop.create_future()
        loop = self._loop

        def delivered(error, _message) -> None:
            try:
                loop.call_soon_threadsafe(_settle, future, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        self._producer.produce(topic, value=value, key=key, headers=list(headers), timestamp=timestamp_ms,
                               on_delivery=delivered)
        return future

    async def stop(self, timeout: float = 10) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, timeout)
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()


def _settle(future: asyncio.Future, error) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(confluent_kafka.KafkaException(error))


def make_producer(settings: Settings, client_id: str, **extra) -> LoopProducer:
    return LoopProducer(producer_config(settings, client_id, **extra))


class EventPublisher:
    """Publishes events to their declared topics.

    ``publish`` waits for the broker's acknowledgement (acks=all) and is what
    the 250 after DATA waits on. ``emit`` is for audit events that must not
    hold up the SMTP dialogue: they are handed to the producer in the order
    they were emitted and their failures are logged.
    """

    def __init__(self, producer: LoopProducer, backlog_limit: int = 20000):
        self.producer = producer
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._drainer: asyncio.Task | None = None
        self.emit_failures = 0
        #: Audit events emitted and not yet acknowledged by the broker. During
        #: a broker outage it grows; at ``backlog_limit`` ingest stops taking
        #: new sessions and mail (``backlogged``: 421 / 451) so memory stays
        #: bounded; at twice the limit (what sessions already under way may
        #: still add) further events are dropped and counted, never held.
        self.backlog = 0
        self.backlog_limit = backlog_limit
        self.dropped = 0

    async def start(self) -> None:
        await self.producer.start()
        self._drainer = asyncio.create_task(self._drain(), name="event-emitter")

    async def stop(self) -> None:
        await self._queue.join()
        if self._drainer:
            self._drainer.cancel()
        await self.producer.stop()

    async def _send(self, event: Event) -> asyncio.Future:
        spec = topic_for(type(event))
        value, headers = codec.encode(event)
        try:
            future = await self.producer.send(
                spec.name, value=value, key=record_key(spec, event), headers=headers, timestamp_ms=event.timestamp_ms,
            )
        except Exception:
            metrics.event_published(spec.name, event.TYPE, ok=False)
            raise
        metrics.publishing(spec.name, event.TYPE, future)
        return future

    async def publish(self, event: Event):
        """Send and wait until the broker has the event; raises on failure."""
        future = await self._send(event)
        return await future

    @property
    def backlogged(self) -> bool:
        return self.backlog >= self.backlog_limit

    def emit(self, event: Event) -> None:
        if self.backlog >= 2 * self.backlog_limit:
            self.dropped += 1
            metrics.EVENTS_DROPPED.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit events dropped: %d (the broker has not acknowledged %d)", self.dropped, self.backlog)
            return
        self.backlog += 1
        self._queue.put_nowait(event)

    async def _drain(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                future = await self._send(event)
                future.add_done_callback(self._acknowledged)
            except Exception:
                self.backlog -= 1
                self.emit_failures += 1
                log.exception("could not publish %s", event.TYPE)
            finally:
                self._queue.task_done()

    def _acknowledged(self, future: asyncio.Future) -> None:
        self.backlog -= 1
        if not future.cancelled() and future.exception() is not None:
            self.emit_failures += 1
            log.warning("audit event lost: %s", future.exception())


class DurableLog:
    """Records the events a 250 reply depends on, in Kafka transactions.

    Concurrent sessions share one transaction (group commit): the committer
    takes every event waiting, sends them all, commits once and answers every
    waiter. So no session pays for a private flush, and none waits for
    another's.

    Why transactions: an idempotent producer may still deliver a record
    after its send was reported timed out (librdkafka calls it "possibly
    persisted"), and the client, told 451, would send the message again.
    Here a batch that is not committed in time is abandoned; a fresh producer
    with the same transactional id fences the old one, which aborts its
    transaction, and read_committed consumers never see the records. "451"
    means "not recorded" (except in the inherent window where the commit
    reached the broker and its answer did not reach us, RFC 1047).

    librdkafka's transactions, not aiokafka's: a one-record transaction took
    7 ms (p50) against 30 ms on the same broker (docs/operations.md, "Kafka clients").
    Its transaction calls block, so they run on a worker thread.
    """

    def __init__(self, settings: Settings, transactional_id: str):
        self.settings = settings
        self.transactional_id = transactional_id
        self.deadline = 2 * settings.kafka_request_timeout_ms / 1000
        self._producer: confluent_kafka.Producer | None = None
        self._waiting: list[tuple[Event, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task | None = None
        self._reconnect: asyncio.Task | None = None
        #: Abandoned producers, kept so that librdkafka's blocking destroy
        #: never runs on the event loop: one per outage.
        self._retired: list[confluent_kafka.Producer] = []

    def _new_producer(self) -> confluent_kafka.Producer:
        return confluent_kafka.Producer(producer_config(
            self.settings, self.transactional_id, **{
                "transactional.id": self.transactional_id,
                # The records of a group commit go out at once: commit_transaction flushes.
                "linger.ms": 0,
                "transaction.timeout.ms": max(60000, int(4 * self.deadline * 1000)),
            }))

    async def _started_producer(self) -> confluent_kafka.Producer:
        # On a worker thread, creation included: a producer that fails to
        # start is destroyed there too (librdkafka's destroy may block).
        return await asyncio.to_thread(self._init_producer)

    def _init_producer(self) -> confluent_kafka.Producer:
        producer = self._new_producer()
        # Same transactional id: the broker fences any earlier producer and
        # aborts whatever it left open.
        producer.init_transactions(self.deadline)
        return producer

    async def start(self) -> None:
        self._producer = await self._started_producer()
        self._committer = asyncio.create_task(self._commit_loop(), name="durable-log")

    async def stop(self) -> None:
        if self._committer:
            self._committer.cancel()
        if self._reconnect:
            self._reconnect.cancel()

    async def record(self, event: Event) -> None:
        """Return once the event is committed; raise if it is not."""
        if self._producer is None:
            raise ConnectionError("the event log is unavailable (reconnecting to Kafka)")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((event, future))
        self._wake.set()
        await future

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            producer = self._producer
            try:
                if producer is None:
                    raise ConnectionError("the event log is unavailable (reconnecting to Kafka)")
                attempt = asyncio.create_task(self._commit(producer, [e for e, _ in batch]))
                # Not wait_for: that would wait for the cancelled commit to
                # unwind, and against a dead broker that can take minutes.
                done, _ = await asyncio.wait({attempt}, timeout=self.deadline)
                if not done:
                    raise TimeoutError(f"no commit within {self.deadline:g}s")
                attempt.result()
            except Exception as exc:  # timeout, broker gone, fenced...
                for event, future in batch:
                    metrics.event_published(topic_for(type(event)).name, event.TYPE, ok=False)
                    if not future.done():
                        future.set_exception(ConnectionError(f"not recorded: {type(exc).__name__}"))
                if producer is not None and producer is self._producer:
                    self._abandon(producer)
            else:
                for event, future in batch:
                    metrics.event_published(topic_for(type(event)).name, event.TYPE)
                    if not future.done():
                        future.set_result(None)

    async def _commit(self, producer: confluent_kafka.Producer, events: list[Event]) -> None:
        # No abort on failure: the producer is abandoned, and fencing it
        # aborts its transaction on the broker, which works even when this
        # process cannot reach the broker right now.
        producer.begin_transaction()
        for event in events:
            spec = topic_for(type(event))
            value, headers = codec.encode(event)
            producer.produce(spec.name, value=value, key=record_key(spec, event), headers=headers,
                             timestamp=event.timestamp_ms)
        await asyncio.to_thread(producer.commit_transaction, self.deadline)

    def _abandon(self, producer: confluent_kafka.Producer) -> None:
        self._producer = None
        self._retired.append(producer)
        # Drop what it still holds; its open transaction is aborted by the fencing.
        threading.Thread(target=producer.purge, daemon=True).start()
        log.error("event log unavailable; answering 451 until Kafka is back")

        async def reconnect():
            while True:
                try:
                    fresh = await self._started_producer()
                except Exception:
                    await asyncio.sleep(1)
                    continue
                self._producer = fresh
                log.info("event log available again")
                return

        self._reconnect = asyncio.create_task(reconnect())


@dataclass
class TopicReport:
    name: str
    status: str  # created, ok, or a description of the mismatch


async def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = ALL_TOPICS) -> list[TopicReport]:
    """Create the declared topics that are missing; report how existing ones differ."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bulwark-topics",
                                **aiokafka_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        reports = []
        for spec in specs:
            if spec.name in existing:
                reports.append(TopicReport(spec.name, "ok"))
                continue
            topic = NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=1,
                topic_configs=spec.topic_config(settings.audit_retention_ms),
            )
            try:
                await admin.create_topics([topic])
                reports.append(TopicReport(spec.name, "created"))
            except TopicAlreadyExistsError:  # a concurrent ensure won the race
                reports.append(TopicReport(spec.name, "ok"))
        # Partition counts are compared for topics that already existed (a
        # topic created a moment ago may not be described fully yet).
        existed = [spec for spec, report in zip(specs, reports) if report.status == "ok"]
        if existed:
            described = await admin.describe_topics([spec.name for spec in existed])
            partitions = {d["topic"]: len(d["partitions"]) for d in described}
            for report, spec in zip(reports, specs):
                have = partitions.get(spec.name)
                if report.status == "ok" and have != spec.partitions:
                    report.status = f"has {have} partitions, declared {spec.partitions}"
        return reports
    finally:
        await admin.close()


async def seed_group_offsets(settings: Settings, group_id: str, topics: list[str]) -> list[TopicPartition]:
    """Commit each partition's first offset for a consumer group that has none there yet.

    A Faust worker given a partition for which its group has no committed
    offset was seen to begin at the partition's end, not at its beginning as
    configured (bench/chaos.py: messages answered 250 that no worker ever
    judged; docs/operations.md, "Chaos"). With an offset committed for every
    partition from the start, a worker never has to guess. Only an empty
    group can take such a commit (no member, no generation): run it before
    the workers start, as `bulwark topics ensure` does. Returns the
    partitions seeded; a group that has members is left alone.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bulwark-topics",
                                **aiokafka_options(settings))
    await admin.start()
    try:  # the internal topics are not declared in schemas/: ask the broker
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    partitions = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group_id,
                                enable_auto_commit=False, client_id="bulwark-topics", **aiokafka_options(settings))
    await consumer.start()
    try:
        consumer.assign(partitions)
        missing = [tp for tp in partitions if await consumer.committed(tp) is None]
        if not missing:
            return []
        starts = await consumer.beginning_offsets(missing)
        try:
            await consumer.commit({tp: OffsetAndMetadata(starts[tp], "") for tp in missing})
        except (CommitFailedError, IllegalGenerationError, UnknownMemberIdError) as exc:
            log.warning("group %s has members; its offsets are left as they are (%s)", group_id, exc)
            return []
        return missing
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: Event


async def read_topics(
    settings: Settings,
    topics: list[str],
    keys: set[bytes] | None = None,
    since: datetime | None = None,
) -> list[Record]:
    """Every event on these topics up to their current end, optionally only some keys.

    Reads without a consumer group, so it disturbs no running component.
    Records that are not Bulwark events are skipped with a warning.
    """
    return [record async for record in iter_records(settings, topics, keys, since)]


async def iter_records(
    settings: Settings,
    topics: list[str],
    keys: set[bytes] | None = None,
    since: datetime | None = None,
    types: set[str] | None = None,
) -> AsyncIterator[Record]:
    """The records of ``read_topics`` one at a time, for reads too large to hold at once.

    ``since``: start at each partition's first record stamped at or after
    that time (records carry their event's time), not at the beginning.
    ``types``: only these event types, told by the record's type header
    before anything is decoded.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        client_id="bulwark-reader",
        **aiokafka_options(settings),
    )
    await consumer.start()
    try:
        # The declarations say how many partitions each topic has (and
        # `bulwark topics ensure` checks that the cluster agrees).
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(BY_NAME[topic].partitions)]
        if not partitions:
            return
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        if since is not None and remaining:
            starts = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in remaining})
            for tp in list(remaining):
                if starts.get(tp) is None:  # nothing stamped at or after `since`
                    remaining.discard(tp)
                else:
                    consumer.seek(tp, starts[tp].offset)
        wanted = {t.encode() for t in types} if types is not None else None
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, messages in batch.items():
                for msg in messages:
                    if msg.offset >= ends[tp]:
                        continue
                    if keys is not None and msg.key not in keys:
                        continue
                    if wanted is not None:
                        kind = dict(msg.headers or ()).get(codec.HEADER_TYPE)
                        if kind is not None and kind not in wanted:
                            continue
                    try:
                        event = codec.decode(msg.value, msg.headers)
                    except (codec.UnknownEvent, ValueError) as exc:
                        log.warning("skipping %s[%d]@%d: %s", tp.topic, tp.partition, msg.offset, exc)
                        continue
                    if types is None or event.TYPE in types:
                        yield Record(tp.topic, tp.partition, msg.offset, msg.key, event)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


#: How long a client that found no broker at start waits before trying again.
BROKER_RETRY_SECONDS = 2.0


#: For consumers off the path of any SMTP reply or delivery (the quarantine
#: and DMARC-report sinks, the trace index, the unjudged-message safety
#: net): the broker holds a fetch until this many bytes have arrived or
#: BATCH_FETCH_WAIT_MS has passed. With the default (one byte) each fetch
#: brought the one or two records written since the last, a fetch request
#: per two messages from each of these consumers; now at most two a second
#: each, records at most half a second later (docs/performance.md,
#: "Seventh session").
BATCH_FETCH_MIN_BYTES = 256 * 1024
BATCH_FETCH_WAIT_MS = 500


def batch_fetch_config() -> dict:
    """``BATCH_FETCH_*`` as librdkafka consumer settings."""
    return {"fetch.min.bytes": BATCH_FETCH_MIN_BYTES, "fetch.wait.max.ms": BATCH_FETCH_WAIT_MS}


async def consume(
    settings: Settings, group_id: str, topics: list[str], handle: Callable[[list[Event]], Awaitable[None]],
    batched: bool = False,
) -> None:
    """Consume topics with a group, handing decoded events to ``handle`` a batch at a time.

    ``batched``: for a consumer off the reply and delivery path, fetch in
    batches (``BATCH_FETCH_MIN_BYTES``): fewer broker requests, records up to
    ``BATCH_FETCH_WAIT_MS`` later.

    Offsets are committed after ``handle`` returns, so a crash redelivers the
    batch and ``handle`` must be idempotent. They are committed at most every
    ``COMMIT_EVERY_SECONDS`` (and when the consumer stops): a commit per batch
    was an OffsetCommit request to the broker for every two or three
    messages from each sink, ~1 of the ~12 requests a relayed message cost
    the broker (its request log under bench/e2e_relay.py); a crash now
    redelivers up to a second of records, which ``handle`` already absorbs.
    """
    while True:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # never act on an aborted transaction
            client_id=group_id,
            **({"fetch_min_bytes": BATCH_FETCH_MIN_BYTES, "fetch_max_wait_ms": BATCH_FETCH_WAIT_MS} if batched else {}),
            **aiokafka_options(settings),
        )
        try:
            await consumer.start()
            break
        except KafkaConnectionError as exc:
            # Started (or restarted by its supervisor) while the broker is
            # down: wait for it, as the state views and publishers do, rather
            # than exit and crash-loop until the supervisor gives up
            # (tests/integration/test_chaos.py met this with the quarantine sink).
            await consumer.stop()
            log.warning("waiting for Kafka at %s (group %s): %s", settings.kafka_bootstrap, group_id, exc)
            await asyncio.sleep(BROKER_RETRY_SECONDS)
    lag_at = 0.0
    handled: dict = {}  # partition -> the offset after the last record ``handle`` finished
    committed_at = time.monotonic()

    async def commit() -> None:
        # Only what was handled (not merely fetched), and only partitions
        # still assigned: a rebalance hands the others to another member.
        offsets = {tp: offset for tp, offset in handled.items() if tp in consumer.assignment()}
        handled.clear()
        if offsets:
            await consumer.commit(offsets)

    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=200)
            events = []
            for tp, records in batch.items():
                metrics.EVENTS_CONSUMED.labels(group=group_id, topic=tp.topic).inc(len(records))
                for record in records:
                    try:
                        events.append(codec.decode(record.value, record.headers))
                    except (codec.UnknownEvent, ValueError) as exc:
                        log.error("skipping %s@%d: %s", record.topic, record.offset, exc)
            if events:
                await handle(events)
            for tp, records in batch.items():
                handled[tp] = records[-1].offset + 1
            if handled and time.monotonic() - committed_at >= COMMIT_EVERY_SECONDS:
                await commit()
                committed_at = time.monotonic()
            if time.monotonic() - lag_at >= LAG_EVERY_SECONDS:
                lag_at = time.monotonic()
                await record_lag(consumer, group_id, topics)
    finally:
        try:
            await commit()  # what was handled, so that a clean stop redelivers nothing
        except Exception as exc:  # a broker gone, a rebalance: redelivered, and handled again
            log.warning("group %s: last offsets not committed at stop: %s", group_id, exc)
        await consumer.stop()


#: How often ``consume`` commits what its handler finished (see there).
COMMIT_EVERY_SECONDS = 1.0


#: How often a consumer's lag is measured (a local computation: no request).
LAG_EVERY_SECONDS = 1.0


async def record_lag(consumer: AIOKafkaConsumer, group_id: str, topics: list[str]) -> dict[str, int]:
    """Set the consumer-lag gauge of each topic: records committed to it and not yet consumed here.

    The end is the last stable offset (this consumer reads committed
    records only), as of the last fetch; a partition nothing was fetched
    from yet is left out.
    """
    lag = {topic: 0 for topic in topics}
    for tp in consumer.assignment():
        end = consumer.last_stable_offset(tp)
        if end is None:
            end = consumer.highwater(tp)
        if end is None:
            continue
        try:
            position = await consumer.position(tp)
        except Exception:  # revoked meanwhile (a rebalance): another member reports it
            continue
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - position)
    for topic, records in lag.items():
        metrics.CONSUMER_LAG.labels(group=group_id, topic=topic).set(records)
    return lag


#: linger.ms for a publisher whose events mostly wait for nobody: ingest's
#: session events (emitted, not awaited) and the delivery sink's
#: delivery.queued / delivery.attempted (awaited by the sink only, after the
#: 250 was given). Against the default 5 ms, a request carries five times as
#: many records at any load, and the broker answers fewer requests per
#: message (docs/performance.md, "Seventh session").
BATCHING_LINGER_MS = 25


async def start_publisher(settings: Settings, client_id: str, linger_ms: int | None = None) -> EventPublisher:
    """A started publisher; waits for the broker rather than failing at start-up.

    ``linger_ms``: how long librdkafka may hold a record to send it with
    others (``producer_config``'s 5 ms when None)."""
    extra = {} if linger_ms is None else {"linger.ms": linger_ms}
    while True:
        publisher = EventPublisher(make_producer(settings, client_id, **extra), settings.audit_backlog_limit)
        try:
            await publisher.start()
            return publisher
        except Exception as exc:
            log.warning("waiting for Kafka at %s: %s", settings.kafka_bootstrap, exc)
            await asyncio.sleep(2)


async def publish_once(settings: Settings, event: Event, client_id: str = "bulwark-cli") -> None:
    """Publish one event and wait for the broker: what a CLI command does."""
    publisher = EventPublisher(make_producer(settings, client_id))
    await publisher.start()
    try:
        await publisher.publish(event)
    finally:
        await publisher.stop()

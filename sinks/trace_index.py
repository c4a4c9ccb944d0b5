"""``bulwark sinks trace-index``: keeps the trace index as the message topics are written.

It reads ``smtp.sessions`` and the message topics (consumer group
``bulwark-trace-index``), turns each batch into index entries
(``bulwark/trace_index.py``), publishes the changed keys to the compacted
``trace.index`` topic, waits for the broker, then writes them to its RocksDB
store in one synced write together with the offsets the batch reaches, and
commits those offsets to the group (so Kafka's tools show its lag).

Where it resumes: the offsets in its store, which are written atomically
with the entries, so a crash (SIGKILL included) between two steps loses
nothing and a batch read twice changes nothing (locations are sets). A
store that is lost is rebuilt from ``trace.index`` before reading on: the
changelog is written first, so it is never behind the store, and a
partition's position record follows the entries it covers.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import confluent_kafka

from bulwark import metrics
from bulwark import trace_index as ix
from bulwark.kafka import batch_fetch_config, consumer_config, producer_config
from bulwark.service import configure_logging
from bulwark.settings import Settings
from schemas.topics import TRACE_INDEX

log = logging.getLogger(__name__)

GROUP = "bulwark-trace-index"
BATCH = 5000
PROGRESS_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0
#: How often a busy indexer moves its write-ahead log into table files (what a trace opening the store replays).
SETTLE_SECONDS = 10.0


class TraceIndexer:
    def __init__(self, settings: Settings, store: ix.IndexStore, stop: threading.Event):
        self.settings = settings
        self.store = store
        self.stop = stop
        self.indexed = 0
        self._failed: list[confluent_kafka.KafkaError] = []
        self.producer = confluent_kafka.Producer(producer_config(settings, GROUP, **{"linger.ms": 20}))

    def restore(self) -> int:
        """Fill an empty store from the changelog; returns the keys restored."""
        consumer = ix.reader(self.settings, f"{GROUP}-restore")
        restored = 0
        try:
            tp = confluent_kafka.TopicPartition(TRACE_INDEX.name, 0, confluent_kafka.OFFSET_BEGINNING)
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high == 0:
                return 0
            consumer.assign([tp])
            done = False
            while not done and not self.stop.is_set():
                changes = {}
                for msg in consumer.consume(num_messages=BATCH, timeout=1.0):
                    if msg.error() is not None:
                        done = done or msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF
                        continue
                    if msg.value() is not None:
                        changes[msg.key().decode()] = msg.value()
                    done = done or msg.offset() + 1 >= high
                self.store.write(changes)
                restored += len(changes)
            log.info("restored %d index keys from %s", restored, TRACE_INDEX.name)
            return restored
        finally:
            consumer.close()

    def run(self) -> None:
        if self.store.empty():
            self.restore()
        consumer = confluent_kafka.Consumer(consumer_config(self.settings, GROUP, **{
            # Static membership: a restarted indexer takes its partitions back at once.
            "group.instance.id": GROUP,
            # A trace reads what the index has not read yet from the topics
            # (bulwark/trace_index.py), so batching costs no freshness.
            **batch_fetch_config(),
        }))
        consumer.subscribe(ix.INDEXED_TOPICS, on_assign=self._assigned)
        log.info("indexing %s into %s", ", ".join(ix.INDEXED_TOPICS), self.store.path)
        progress = time.monotonic()
        settled, settled_at = True, time.monotonic()
        try:
            while not self.stop.is_set():
                entries = ix.Entries()
                for msg in consumer.consume(num_messages=BATCH, timeout=0.5):
                    if msg.error() is not None:
                        if msg.error().fatal():
                            raise confluent_kafka.KafkaException(msg.error())
                        log.warning("%s", msg.error())
                        continue
                    entries.add(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers(),
                                msg.timestamp()[1])
                    metrics.EVENTS_CONSUMED.labels(group=GROUP, topic=msg.topic()).inc()
                if not entries.positions:
                    if not settled:  # caught up: readers open the store faster with an empty log
                        self.store.settle()
                        settled, settled_at = True, time.monotonic()
                    continue
                if not self.index(entries):
                    break  # stopping: this batch is indexed again next time
                settled = False
                if time.monotonic() - settled_at > SETTLE_SECONDS:  # never idle: settle now and then anyway
                    self.store.settle()
                    settled_at = time.monotonic()
                try:  # for Kafka's tools only: the store's own offsets are where the indexer resumes
                    consumer.commit(offsets=[confluent_kafka.TopicPartition(t, p, o)
                                             for (t, p), o in entries.positions.items()], asynchronous=True)
                except confluent_kafka.KafkaException as exc:
                    log.warning("offsets not committed to %s: %s", GROUP, exc)
                self.indexed += entries.records
                if time.monotonic() - progress > PROGRESS_SECONDS:
                    progress = time.monotonic()
                    log.info("%d records indexed so far", self.indexed)
        finally:
            consumer.close()
            self.producer.flush(10)
            log.info("stopped after %d records", self.indexed)

    def index(self, entries: ix.Entries) -> bool:
        """Changelog first, then the store (entries and positions in one write); False if told to stop first.

        A changelog write that fails (the broker away) is tried again, the
        whole batch, until it succeeds: nothing of it is in the store yet.
        """
        changes = self.store.merged(entries)
        delay = 0.5
        while True:
            for key, value in changes.items():
                self._produce(key.encode(), value)
            self.producer.flush()
            if not self._failed:
                break
            error, self._failed = self._failed[0], []
            log.warning("%s not written (%s); again in %.1fs", TRACE_INDEX.name, error, delay)
            if self.stop.wait(delay):
                return False
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        self.store.write(changes)
        return True

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(TRACE_INDEX.name, key=key, value=value, on_delivery=self._delivered)
                return
            except BufferError:  # librdkafka's queue is full: let it send
                self.producer.poll(0.1)

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self._failed.append(error)

    def _assigned(self, consumer: confluent_kafka.Consumer, partitions) -> None:
        positions = self.store.positions()
        for tp in partitions:
            tp.offset = positions.get((tp.topic, tp.partition), confluent_kafka.OFFSET_BEGINNING)
        consumer.assign(partitions)
        log.info("assigned %d partitions, resuming from the store's offsets", len(partitions))


def serve(settings: Settings) -> None:
    configure_logging("trace-index")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = ix.IndexStore(ix.store_path(settings))
    metrics_server = metrics.start("trace-index", settings)
    try:
        TraceIndexer(settings, store, stop).run()
    except confluent_kafka.KafkaException as exc:
        log.error("stopped: %s", exc.args[0])
        raise SystemExit(1) from None
    finally:
        store.close()
        if metrics_server is not None:
            metrics_server.shutdown()

"""``bulwark sinks unjudged``: a safety net for messages answered 250 that no worker ever judged.

Why it exists. The chaos run (docs/operations.md, "Chaos") found messages
recorded on ``mail.received`` that no Faust worker ever judged: a worker
given a partition with no committed offset began at the partition's end.
`bulwark topics ensure` now seeds the workers' offsets, but the cause inside
Faust or aiokafka is not found, and partitions added while workers run are
not seeded. So this process watches the outcome instead of the cause: every
message on ``mail.received`` must get a verdict (or a ``message.refused``)
on ``mail.verdicts``. One that has waited longer than
``BULWARK_UNJUDGED_AFTER_SECONDS`` (120 s by default) is written to
``mail.received`` again: the same key (so the same partition), the same
value and record timestamp, and one more header, ``bulwark-resend``, with
how many times it has been sent again. It logs a warning naming the
message and counts the re-send; after ``BULWARK_UNJUDGED_MAX_RESENDS``
re-sends with still no verdict it logs an error and counts the message as
given up: never a silent drop.

Why re-sending is safe. The content agent remembers each message it judged
(the ``content-judged`` table, streams/app.py) and skips a second copy of a
record it has judged or is judging; the record timestamp is kept so the copy falls in
the same window of that table. A copy read by a worker that never judged
the original is judged once. Should both copies ever be judged (a crash
between publishing a verdict and remembering it), the sinks act on the
first verdict only (sinks/first_verdict.py). Outbreak Protection and
Account Hijack Detection deduplicate by offset, so a copy is counted again
by them only when they had counted the original, which the bug above
skips for every agent alike.

Why 120 s. A message is judged well under a second after its 250; a
worker's failover (a 15 s session timeout, the rebalance, the tables'
recovery) takes tens of seconds, and a backlog after a broker restart
somewhat more. Two minutes stays clear of all of that, so a re-send means
a message really was skipped, and still gets it delivered within minutes.
A re-send that comes too early costs only a duplicate record.

What happens after SIGKILL. Nothing pending is kept anywhere but in Kafka:

- ``mail.received`` offsets are committed only up to the earliest record
  still waiting for its verdict on each partition (or the next offset when
  none waits), so a restart reads every pending message again, with the
  copies it already sent (their ``bulwark-resend`` header gives the count
  back; the next re-send then waits one more period).
- ``mail.verdicts`` is not read from committed offsets: each commit on
  ``mail.received`` carries, as its metadata, the record timestamp where it
  points, and a restart reads ``mail.verdicts`` from that time less
  ``VERDICT_LOOKBACK`` (clock skew between ingest and the workers). A
  verdict is written after its message, so every verdict of a message read
  again is read again too.
- Before re-sending, the verdicts must have been read far enough: on the
  message's partition (both topics are keyed by message id with murmur2, so
  its verdict is on the same partition number), either nothing is left to
  read or a verdict stamped after the message's due time has been read. A
  restart does not re-send what was judged meanwhile just because the
  verdicts were not read yet.

confluent-kafka, read_committed (an aborted ``mail.received``, a message
answered 451, is never seen), one loop: like the SIEM export and the trace
indexer, this is a blocking loop with nothing to overlap.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import confluent_kafka

from bulwark import metrics
from bulwark.kafka import batch_fetch_config, consumer_config, producer_config
from bulwark.service import configure_logging
from bulwark.settings import Settings
from schemas.codec import HEADER_RESEND, HEADER_TYPE
from schemas.events import MessageReceived, MessageRefused, Verdict
from schemas.topics import RECEIVED, VERDICTS

log = logging.getLogger(__name__)

GROUP = "bulwark-unjudged"
BATCH = 500
#: How far before a pending message's time a restart reads mail.verdicts from (clock skew between hosts).
VERDICT_LOOKBACK_MS = 5 * 60 * 1000
#: How long a verdict read before its message is remembered (a restart reads verdicts from further back).
JUDGED_MEMORY_SECONDS = 15 * 60
#: How often due messages are looked for and offsets committed.
TICK_SECONDS = 1.0

SETTLES = {Verdict.TYPE.encode(), MessageRefused.TYPE.encode()}


@dataclass
class Waiting:
    """A message received and not judged yet: its original record, to be sent again as it was."""

    message_id: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    headers: list[tuple[str, bytes]]
    #: When it is next due (wall clock, seconds): its time plus the period, then one period after each re-send.
    due: float
    resends: int = 0
    given_up: bool = False


@dataclass
class Ledger:
    """The messages received and not yet judged, and where each partition may be committed.

    Pure bookkeeping, no Kafka: the loop below feeds it records and asks it
    what is due and what to commit.
    """

    after: float
    max_resends: int
    pending: dict[str, Waiting] = field(default_factory=dict)
    #: Message id -> when its verdict was read (wall clock), for verdicts read before their message.
    judged: dict[str, float] = field(default_factory=dict)
    #: Received partition -> (next offset to read, timestamp of the last record read).
    read_to: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Verdict partition -> the latest verdict record timestamp read.
    verdicts_to: dict[int, int] = field(default_factory=dict)

    def received(self, partition: int, offset: int, message_id: str, timestamp_ms: int, value: bytes,
                 headers: list[tuple[str, bytes]], resend: int, now: float) -> None:
        self.read_to[partition] = (offset + 1, max(timestamp_ms, self.read_to.get(partition, (0, 0))[1]))
        if message_id in self.judged:
            return
        waiting = self.pending.get(message_id)
        if resend:
            # A copy this net sent earlier, read again after a restart: the
            # count comes back from it, and the next copy waits a period.
            if waiting is not None and resend > waiting.resends:
                waiting.resends = resend
                waiting.due = max(waiting.due, now + self.after)
            return
        if waiting is None:
            self.pending[message_id] = Waiting(message_id, partition, offset, timestamp_ms, value,
                                               [(k, v) for k, v in headers if k != HEADER_RESEND],
                                               due=timestamp_ms / 1000 + self.after)

    def verdict(self, partition: int, message_id: str, timestamp_ms: int, now: float) -> Waiting | None:
        """A verdict (or a refusal) for the message: it waits no more. Returns what was waiting, if anything."""
        self.verdicts_to[partition] = max(timestamp_ms, self.verdicts_to.get(partition, 0))
        self.judged[message_id] = now
        return self.pending.pop(message_id, None)

    def due(self, now: float, caught_up: Callable[[int, float], bool] = lambda partition, due: True) -> list[Waiting]:
        """Messages whose period has passed with no verdict, not given up, and whose verdicts were read far enough."""
        return [w for w in self.pending.values()
                if not w.given_up and w.due <= now and caught_up(w.partition, w.due)]

    def resent(self, waiting: Waiting, now: float) -> None:
        waiting.resends += 1
        waiting.due = now + self.after

    def give_up(self, waiting: Waiting) -> None:
        waiting.given_up = True

    def commit_positions(self) -> dict[int, tuple[int, int]]:
        """Received partition -> (offset, timestamp ms) to commit: the earliest record still waiting, else the next.

        A message given up on no longer holds its partition back: it was
        logged as an error and counted, and holding it would make every
        restart read everything since.
        """
        positions = dict(self.read_to)
        for w in self.pending.values():
            if w.given_up:
                continue
            here = positions.get(w.partition)
            if here is None or w.offset < here[0]:
                positions[w.partition] = (w.offset, w.timestamp_ms)
        return positions

    def forget_partitions(self, partitions: set[int]) -> None:
        """Partitions moved to another process of the group: it reads their messages again from the commit."""
        self.pending = {k: w for k, w in self.pending.items() if w.partition not in partitions}
        for p in partitions:
            self.read_to.pop(p, None)
            self.verdicts_to.pop(p, None)

    def prune(self, now: float) -> None:
        cutoff = now - max(JUDGED_MEMORY_SECONDS, 4 * self.after)
        self.judged = {k: at for k, at in self.judged.items() if at >= cutoff}

    def counts(self) -> tuple[int, int]:
        given_up = sum(1 for w in self.pending.values() if w.given_up)
        return len(self.pending) - given_up, given_up


def resend_count(headers: list[tuple[str, bytes]] | None) -> int:
    for key, value in headers or ():
        if key == HEADER_RESEND:
            try:
                return int(value)
            except ValueError:
                return 1
    return 0


def _header(headers, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


class SafetyNet:
    def __init__(self, settings: Settings, stop: threading.Event):
        self.settings = settings
        self.stop = stop
        self.ledger = Ledger(settings.unjudged_after_seconds, settings.unjudged_max_resends)
        self.consumer = confluent_kafka.Consumer(consumer_config(settings, GROUP, **{
            # Static membership: a restarted net takes its partitions back at once.
            "group.instance.id": GROUP,
            # The range assignor gives a process the same partition numbers of
            # both topics: a message's verdict is on its message's partition.
            "partition.assignment.strategy": "range",
            # Off every reply's path: it acts minutes after a record.
            **batch_fetch_config(),
        }))
        self.producer = confluent_kafka.Producer(producer_config(settings, GROUP, **{"linger.ms": 0}))
        self._failed: list[confluent_kafka.KafkaError] = []

    # -- assignment ------------------------------------------------------------------------

    def _assigned(self, consumer: confluent_kafka.Consumer, partitions) -> None:
        """mail.received from the committed offsets; mail.verdicts from the time those point at, less the lookback."""
        received = [confluent_kafka.TopicPartition(RECEIVED.name, tp.partition)
                    for tp in partitions if tp.topic == VERDICTS.name]
        committed = {tp.partition: tp for tp in consumer.committed(received, timeout=30)} if received else {}
        wanted = []
        for tp in partitions:
            if tp.topic == VERDICTS.name:
                mark = committed.get(tp.partition)
                since = _timestamp(mark.metadata) if mark is not None and mark.offset >= 0 else None
                wanted.append(confluent_kafka.TopicPartition(VERDICTS.name, tp.partition,
                                                             max(0, since - VERDICT_LOOKBACK_MS)
                                                             if since is not None else 0))
        starts = {tp.partition: tp.offset for tp in consumer.offsets_for_times(wanted, timeout=30)} if wanted else {}
        for tp in partitions:
            if tp.topic == VERDICTS.name:
                # No committed position (a new group): the whole topic; a time after the last verdict: its end.
                offset = starts.get(tp.partition, confluent_kafka.OFFSET_BEGINNING)
                tp.offset = offset if offset >= 0 else confluent_kafka.OFFSET_END
        consumer.assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions) or "nothing")

    def _revoked(self, consumer: confluent_kafka.Consumer, partitions) -> None:
        self._commit()
        self.ledger.forget_partitions({tp.partition for tp in partitions if tp.topic == RECEIVED.name})

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe([RECEIVED.name, VERDICTS.name], on_assign=self._assigned, on_revoke=self._revoked)
        log.info("watching %s for messages without a verdict on %s after %gs (consumer group %s)",
                 RECEIVED.name, VERDICTS.name, self.ledger.after, GROUP)
        tick = time.monotonic()
        try:
            while not self.stop.is_set():
                self.read(self.consumer.consume(num_messages=BATCH, timeout=0.5))
                if time.monotonic() - tick >= TICK_SECONDS:
                    tick = time.monotonic()
                    self.resend_due(time.time())
                    self._commit()
                    self._gauges()
        finally:
            self._commit()
            self.consumer.close()
            self.producer.flush(10)

    def read(self, messages) -> None:
        now = time.time()
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise confluent_kafka.KafkaException(error)
                log.warning("%s", error)
                continue
            metrics.EVENTS_CONSUMED.labels(group=GROUP, topic=msg.topic()).inc()
            key, headers = msg.key(), msg.headers() or []
            if not key:
                continue
            message_id = key.decode(errors="replace")  # ingest's ids are ASCII; a forged key must not stop the net
            kind = _header(headers, HEADER_TYPE)
            timestamp_ms = msg.timestamp()[1]
            if msg.topic() == RECEIVED.name:
                if kind == MessageReceived.TYPE.encode():
                    self.ledger.received(msg.partition(), msg.offset(), message_id, timestamp_ms, msg.value(),
                                         headers, resend_count(headers), now)
                else:
                    self.ledger.read_to[msg.partition()] = (msg.offset() + 1, timestamp_ms)
            elif kind in SETTLES:
                waited = self.ledger.verdict(msg.partition(), message_id, timestamp_ms, now)
                if waited is not None and waited.resends:
                    log.info("message %s judged after %d re-send(s)", waited.message_id, waited.resends)

    def caught_up(self, partition: int, due: float) -> bool:
        """Were the verdicts of this partition read far enough to know a message due then has none?"""
        if self.ledger.verdicts_to.get(partition, 0) >= due * 1000:
            return True
        tp = confluent_kafka.TopicPartition(VERDICTS.name, partition)
        try:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            [position] = self.consumer.position([tp])
        except (confluent_kafka.KafkaException, ValueError):
            return False
        if high < 0:
            return False  # nothing fetched from it yet
        # Before the first record the position is unknown; one record short
        # is the marker that ends a transaction (ingest writes refusals in
        # transactions), which no record is read past.
        return high == 0 if position.offset < 0 else high - position.offset <= 1

    def resend_due(self, now: float) -> None:
        self.ledger.prune(now)
        for waiting in self.ledger.due(now, self.caught_up):
            if waiting.resends >= self.ledger.max_resends:
                self.ledger.give_up(waiting)
                metrics.UNJUDGED_GIVEN_UP.inc()
                log.error("message %s (%s[%d]@%d) still has no verdict after %d re-sends; giving up: "
                          "see docs/operations.md, Chaos", waiting.message_id, RECEIVED.name, waiting.partition,
                          waiting.offset, waiting.resends)
                continue
            if self.send_again(waiting):
                self.ledger.resent(waiting, now)
                metrics.UNJUDGED_RESENT.inc()
                log.warning("message %s (%s[%d]@%d) has no verdict %.0fs after it was received: sent again (%d)",
                            waiting.message_id, RECEIVED.name, waiting.partition, waiting.offset,
                            now - waiting.timestamp_ms / 1000, waiting.resends)

    def send_again(self, waiting: Waiting) -> bool:
        """Write the original record again with a re-send header; True once the broker has it."""
        self.producer.produce(RECEIVED.name, key=waiting.message_id.encode(), value=waiting.value,
                              headers=[*waiting.headers, (HEADER_RESEND, str(waiting.resends + 1).encode())],
                              timestamp=waiting.timestamp_ms, on_delivery=self._delivered)
        self.producer.flush(2 * self.settings.kafka_request_timeout_ms / 1000)
        if len(self.producer) or self._failed:
            error = self._failed[0] if self._failed else "not acknowledged in time"
            self._failed = []
            log.warning("message %s not sent again (%s); trying again in %.0fs", waiting.message_id, error,
                        TICK_SECONDS)
            return False
        return True

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self._failed.append(error)

    def _commit(self) -> None:
        positions = self.ledger.commit_positions()
        if not positions:
            return
        offsets = [confluent_kafka.TopicPartition(RECEIVED.name, partition, offset, metadata=str(timestamp_ms))
                   for partition, (offset, timestamp_ms) in positions.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except confluent_kafka.KafkaException as exc:
            # Behind is safe: a restart reads more again, and finds its copies by their header.
            if exc.args[0].code() != confluent_kafka.KafkaError._NO_OFFSET:
                log.warning("offsets not committed to %s: %s", GROUP, exc)

    def _gauges(self) -> None:
        waiting, given_up = self.ledger.counts()
        metrics.UNJUDGED_PENDING.labels(state="waiting").set(waiting)
        metrics.UNJUDGED_PENDING.labels(state="given_up").set(given_up)


def _timestamp(metadata: str | None) -> int | None:
    try:
        return int(metadata) if metadata else None
    except ValueError:
        return None


def serve(settings: Settings) -> None:
    configure_logging("unjudged")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metrics_server = metrics.start("unjudged", settings)
    try:
        SafetyNet(settings, stop).run()
    except confluent_kafka.KafkaException as exc:
        log.error("stopped: %s", exc.args[0])
        raise SystemExit(1) from None
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()

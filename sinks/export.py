"""``bulwark sinks export``: Bulwark's audit topics to a SIEM, at least once, in order per key.

Each export is one process with its own consumer group
(``bulwark-export-NAME``). It reads a batch, renders every record (ECS JSON
lines, CEF or RFC 5424 syslog), writes the batch to its destination, waits
until the destination has it (``sinks/siem/outputs.py``: fsync for a file,
the collector's TCP acknowledgement for syslog over TLS) and only then
commits the batch's offsets. So a crash at any point, SIGKILL included,
resends from the last commit: a record may arrive twice, none is skipped,
and each partition (so each key) is written in order.

The group uses static membership (its instance id is the group's name):
an export restarted after a crash takes its partitions back at once,
without waiting for the broker to notice the old process is gone, and a
second process started with the same name fences the first, so two writers
never interleave one file.

confluent-kafka's consumer rather than the aiokafka ``consume()`` the other
sinks use: every step here blocks by nature (fsync, a TLS write and its
acknowledgement), so a plain loop on librdkafka says it more simply than an
event loop would, with explicit per-partition commits; and it is the client
Bulwark owns (bulwark/kafka.py), the one the example consumer for SIEM
engineers uses too (examples/siem_consumer.py).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import confluent_kafka

from bulwark import metrics
from bulwark.kafka import consumer_config
from bulwark.service import configure_logging
from bulwark.settings import ExportSettings, Settings
from schemas.topics import ALL_TOPICS, BY_NAME
from sinks.siem import cef, ecs, syslog
from sinks.siem.facts import ExportRecord, facts, read_record
from sinks.siem.outputs import FileOutput, OutputError, StdoutOutput, SyslogTlsOutput, tls_context

log = logging.getLogger(__name__)

FORMATS = ("ecs", "cef", "syslog")
SYSLOG_TLS_PORT = 6514  # RFC 5425 section 4.1
BATCH = 500
MAX_BACKOFF_SECONDS = 30.0
PROGRESS_SECONDS = 60.0
LAG_EVERY_SECONDS = 1.0

Render = Callable[[ExportRecord], bytes]


def default_topics() -> tuple[str, ...]:
    return tuple(spec.name for spec in ALL_TOPICS if spec.kind == "audit")


def group_id(export: ExportSettings) -> str:
    return f"bulwark-export-{export.name}"


def validate(export: ExportSettings) -> None:
    """Raise ValueError naming the setting that is wrong."""
    if export.format not in FORMATS:
        raise ValueError(f"format {export.format!r}: one of {', '.join(FORMATS)}")
    if not export.name or not all(c.isalnum() or c in "-_." for c in export.name):
        raise ValueError(f"name {export.name!r}: letters, digits, '-', '_' and '.' only (it names a consumer group)")
    unknown = [t for t in export.topics if t not in BY_NAME]
    if unknown:
        raise ValueError(f"topic {', '.join(unknown)} is not one of Bulwark's (bulwark topics list)")
    if export.start not in ("earliest", "latest"):
        raise ValueError(f"start {export.start!r}: earliest or latest")
    syslog.facility_code(export.facility)
    if export.to.startswith("tls://"):
        parse_tls_destination(export.to)
    elif "://" in export.to:
        raise ValueError(f"destination {export.to!r}: a file path, tls://HOST[:PORT] or - (standard output)")


def parse_tls_destination(to: str) -> tuple[str, int]:
    rest = to[len("tls://"):].rstrip("/")
    if rest.startswith("["):  # [IPv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"destination {to!r}: tls://HOST[:PORT]")
    return host, int(port) if port else SYSLOG_TLS_PORT


def open_output(export: ExportSettings):
    if export.to == "-":
        return StdoutOutput()
    if export.to.startswith("tls://"):
        host, port = parse_tls_destination(export.to)
        return SyslogTlsOutput(host, port, tls_context(export.ca_file, export.tls_cert, export.tls_key),
                               export.tls_server_name)
    return FileOutput(Path(export.to))


def renderer(export: ExportSettings, hostname: str) -> Render:
    """Record -> bytes for this export's format and destination.

    To a syslog collector every format travels as RFC 5424 messages: the
    syslog format is one; an ECS document or a CEF line is carried as MSG.
    """
    over_syslog = export.to.startswith("tls://")
    facility = syslog.facility_code(export.facility)
    pen = export.enterprise_number

    def render(record: ExportRecord) -> bytes:
        found = facts(record)
        if export.format == "syslog":
            return syslog.message(record, hostname, facility, found, enterprise_number=pen).encode()
        text = ecs.line(record, hostname, found) if export.format == "ecs" else cef.line(record, hostname, found)
        if over_syslog:
            text = syslog.message(record, hostname, facility, found, msg=text, enterprise_number=pen)
        return text.encode()

    return render


class Exporter:
    def __init__(self, settings: Settings, export: ExportSettings, output, render: Render, stop: threading.Event):
        self.settings = settings
        self.export = export
        self.output = output
        self.render = render
        self.stop = stop
        self.topics = list(export.topics or default_topics())
        self.exported = 0

    def consumer(self) -> confluent_kafka.Consumer:
        group = group_id(self.export)
        return confluent_kafka.Consumer(consumer_config(
            self.settings, group, **{
                "auto.offset.reset": self.export.start,
                # Static membership: a restarted export gets its partitions
                # back at once, and a second one with this name fences it.
                "group.instance.id": group,
            }))

    def run(self) -> None:
        consumer = self.consumer()
        consumer.subscribe(self.topics, on_assign=self._assigned)
        log.info("exporting %s as %s to %s (consumer group %s)", ", ".join(self.topics), self.export.format,
                 self.output, group_id(self.export))
        progress = lag_at = time.monotonic()
        try:
            while not self.stop.is_set():
                batch = self._poll(consumer)
                if time.monotonic() - lag_at >= LAG_EVERY_SECONDS:
                    lag_at = time.monotonic()
                    self.record_lag(consumer)
                if not batch:
                    continue
                payloads = [self._render(record) for record in batch]
                if not self._write(payloads):
                    break  # stopping: nothing of this batch is committed, so it is sent again next time
                self._commit(consumer, batch)
                self.exported += len(batch)
                metrics.EXPORTED.labels(export=self.export.name).inc(len(batch))
                if time.monotonic() - progress > PROGRESS_SECONDS:
                    progress = time.monotonic()
                    log.info("%d records exported so far", self.exported)
        finally:
            consumer.close()
            self.output.close()
            log.info("stopped after %d records", self.exported)

    def record_lag(self, consumer: confluent_kafka.Consumer) -> dict[str, int]:
        """Set the consumer-lag gauge of each exported topic: records after this export's position.

        The end is librdkafka's cached high watermark (updated with every
        fetch): no request to the broker.
        """
        lag = {topic: 0 for topic in self.topics}
        try:
            positions = consumer.position(consumer.assignment())
        except confluent_kafka.KafkaException:
            return lag
        for tp in positions:
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            except confluent_kafka.KafkaException:
                continue
            if high < 0:
                continue
            # Before the first record of a partition the position is unknown (negative).
            position = tp.offset if tp.offset >= 0 else high
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - position)
        group = group_id(self.export)
        for topic, records in lag.items():
            metrics.CONSUMER_LAG.labels(group=group, topic=topic).set(records)
        return lag

    def _assigned(self, consumer, partitions) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def _poll(self, consumer: confluent_kafka.Consumer) -> list[ExportRecord]:
        batch = []
        for message in consumer.consume(num_messages=BATCH, timeout=1.0):
            error = message.error()
            if error is not None:
                if _fatal(error):  # e.g. fenced by another export of the same name
                    raise confluent_kafka.KafkaException(error)
                log.warning("%s", error)
                continue
            metrics.EVENTS_CONSUMED.labels(group=group_id(self.export), topic=message.topic()).inc()
            kind, timestamp_ms = message.timestamp()
            if kind == confluent_kafka.TIMESTAMP_NOT_AVAILABLE:
                timestamp_ms = int(time.time() * 1000)
            batch.append(read_record(message.topic(), message.partition(), message.offset(), message.key(),
                                     message.value(), message.headers(), timestamp_ms))
        return batch

    def _render(self, record: ExportRecord) -> bytes:
        if record.event is None:
            log.error("%s[%d]@%d is not an event this version can read (%s); exported as an error record",
                      record.topic, record.partition, record.offset, record.error)
        try:
            return self.render(record)
        except Exception as exc:  # a formatter bug must not stop the export at one record for ever
            log.exception("could not render %s[%d]@%d", record.topic, record.partition, record.offset)
            return self.render(ExportRecord(record.topic, record.partition, record.offset, record.key,
                                            record.timestamp, None, record.event_type,
                                            str(record.event.VERSION) if record.event else record.version,
                                            f"could not be rendered: {type(exc).__name__}"))

    def _write(self, payloads: list[bytes]) -> bool:
        """Write until the destination has the batch; False if told to stop first."""
        delay = 0.5
        while True:
            try:
                self.output.write(payloads)
                return True
            except OutputError as exc:
                metrics.EXPORT_WRITE_FAILURES.labels(export=self.export.name).inc()
                log.warning("not written (%s); again in %.1fs", exc, delay)
            if self.stop.wait(delay):
                return False
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    def _commit(self, consumer: confluent_kafka.Consumer, batch: list[ExportRecord]) -> None:
        ends: dict[tuple[str, int], int] = {}
        for record in batch:
            ends[(record.topic, record.partition)] = record.offset + 1
        try:
            consumer.commit(offsets=[confluent_kafka.TopicPartition(topic, partition, offset)
                                     for (topic, partition), offset in ends.items()], asynchronous=False)
        except confluent_kafka.KafkaException as exc:
            if _fatal(exc.args[0]):
                raise
            # Written but not committed (a rebalance, the broker away): these
            # records are exported again by whoever reads these partitions next.
            log.warning("offsets not committed (%s); the batch will be exported again", exc)


def _fatal(error: confluent_kafka.KafkaError) -> bool:
    """An error this consumer cannot recover from; FENCED_INSTANCE_ID: another export took this name.

    librdkafka reports a fatal error to the application as a message whose
    code is _FATAL, with the fatal flag not always set on that copy.
    """
    return error.fatal() or error.code() in (confluent_kafka.KafkaError._FATAL,
                                             confluent_kafka.KafkaError.FENCED_INSTANCE_ID)


def serve(settings: Settings, export: ExportSettings) -> None:
    configure_logging(f"export-{export.name}")
    validate(export)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    output = open_output(export)
    hostname = export.hostname or socket.getfqdn()
    metrics.start("export", settings)
    for counter in (metrics.EXPORTED, metrics.EXPORT_WRITE_FAILURES):
        counter.labels(export=export.name)  # 0 from the start, for rates and alerts
    try:
        Exporter(settings, export, output, renderer(export, hostname), stop).run()
    except confluent_kafka.KafkaException as exc:
        log.error("stopped: %s", exc.args[0].str())
        raise SystemExit(1) from None

"""The SIEM exporter without Kafka: its destinations, its settings, and commit-after-write.

The syslog destination is exercised against a real TLS collector
(tests/syslog_collector.py) with certificates of a private CA; the whole
exporter against Kafka and the gateway is tests/integration/test_export.py.
"""

from __future__ import annotations

import json
import os
import threading

import confluent_kafka
import pytest

from bulwark.settings import ExportSettings, Settings
from schemas import codec
from sinks.export import Exporter, default_topics, parse_tls_destination, renderer, validate
from sinks.siem.outputs import FileOutput, OutputError, SyslogTlsOutput, tls_context

from tests.export_samples import records
from tests.outbound_servers import Authority
from tests.syslog_collector import Collector

# -- a file ---------------------------------------------------------------------------------


def test_a_file_gets_whole_lines_appended(tmp_path):
    out = FileOutput(tmp_path / "siem" / "events.jsonl")
    out.write([b'{"a":1}', b'{"b":2}'])
    out.write([b'{"c":3}'])
    out.close()
    assert (tmp_path / "siem" / "events.jsonl").read_bytes() == b'{"a":1}\n{"b":2}\n{"c":3}\n'


def test_a_line_torn_by_a_crash_is_cut_before_writing_again(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')  # killed mid-write: that batch was never committed
    out = FileOutput(path)
    out.write([b'{"c":3}'])
    out.close()
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n{"c":3}\n'


def test_a_file_with_no_complete_line_is_emptied(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a"')
    FileOutput(path).write([b"x"])
    assert path.read_bytes() == b"x\n"


def test_a_rotated_file_is_followed(tmp_path):
    path = tmp_path / "events.jsonl"
    out = FileOutput(path)
    out.write([b"1"])
    os.rename(path, tmp_path / "events.jsonl.1")  # logrotate's rename
    out.write([b"2"])
    out.close()
    assert (tmp_path / "events.jsonl.1").read_bytes() == b"1\n"
    assert path.read_bytes() == b"2\n"


def test_a_file_that_cannot_be_written_is_an_output_error(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(OutputError):
        FileOutput(tmp_path / "not-a-dir" / "events.jsonl").write([b"1"])


# -- syslog over TLS ---------------------------------------------------------------------------


@pytest.fixture
def authority(tmp_path) -> Authority:
    return Authority(tmp_path / "ca")


@pytest.fixture
def collector(authority):
    collector = Collector(authority.context("127.0.0.1", "collector.test")).start()
    yield collector
    collector.stop()


def test_syslog_messages_arrive_octet_counted_in_order(authority, collector):
    out = SyslogTlsOutput("127.0.0.1", collector.port, tls_context(authority.ca_file))
    try:
        out.write([b"<134>1 - - - - - - one", "<134>1 - - - - - - tw\u00f6".encode()])
        out.write([b"<134>1 - - - - - - three"])
    finally:
        out.close()
    got = collector.wait_for(lambda m: len(m) == 3)
    assert got == [b"<134>1 - - - - - - one", "<134>1 - - - - - - tw\u00f6".encode(), b"<134>1 - - - - - - three"]
    assert collector.connections == 1 and collector.torn == 0


def test_a_collector_with_an_untrusted_certificate_is_refused(tmp_path, collector):
    other = Authority(tmp_path / "other-ca", name="Someone else's CA")
    out = SyslogTlsOutput("127.0.0.1", collector.port, tls_context(other.ca_file))
    with pytest.raises(OutputError, match="certificate verify failed"):
        out.write([b"<134>1 - - - - - - secret"])
    assert collector.received() == []


def test_the_collector_must_carry_the_expected_name(authority, collector):
    wrong = SyslogTlsOutput("127.0.0.1", collector.port, tls_context(authority.ca_file), "siem.example.test")
    with pytest.raises(OutputError, match="certificate verify failed"):
        wrong.write([b"x"])
    right = SyslogTlsOutput("127.0.0.1", collector.port, tls_context(authority.ca_file), "collector.test")
    right.write([b"y"])
    right.close()
    assert collector.wait_for(lambda m: m) == [b"y"]


def test_a_dropped_connection_is_made_again_and_nothing_is_lost(authority, collector):
    out = SyslogTlsOutput("127.0.0.1", collector.port, tls_context(authority.ca_file), timeout=5)
    try:
        out.write([b"before"])
        collector.wait_for(lambda m: m == [b"before"])
        collector.drop_connections()
        for attempt in range(3):  # what the exporter does: the same batch again until it is written
            try:
                out.write([b"after"])
                break
            except OutputError:
                continue
    finally:
        out.close()
    got = collector.wait_for(lambda m: b"after" in m)
    assert got[0] == b"before" and collector.connections == 2


def test_a_batch_the_collector_has_not_acknowledged_is_not_written(authority):
    """Flushed into the socket is not enough: a stalled collector's TCP acknowledges nothing more."""
    stalled = Collector(authority.context("127.0.0.1"), receive_buffer=4096).start()
    out = SyslogTlsOutput("127.0.0.1", stalled.port, tls_context(authority.ca_file), timeout=1)
    try:
        out.write([b"first"])
        stalled.wait_for(lambda m: m == [b"first"])
        stalled.pause()
        # More than the collector's buffers take, less than the sender's: the TLS write is flushed at once.
        with pytest.raises(OutputError, match="bytes not acknowledged"):
            out.write([b"x" * 1000] * 100)
        stalled.resume()
    finally:
        out.close()
        stalled.stop()


# -- settings -----------------------------------------------------------------------------------


def test_the_default_export_is_every_audit_topic():
    assert default_topics() == ("smtp.sessions", "mail.received", "mail.verdicts", "mail.deliveries",
                                "quarantine.events", "outbreak.fingerprints", "dmarc.reports", "console.logins",
                                "forensics.replay")


def test_export_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BULWARK_EXPORT_NAME", "splunk")
    monkeypatch.setenv("BULWARK_EXPORT_FORMAT", "cef")
    monkeypatch.setenv("BULWARK_EXPORT_TO", "tls://siem.example.test")
    monkeypatch.setenv("BULWARK_EXPORT_TOPICS", "mail.verdicts, quarantine.events")
    monkeypatch.setenv("BULWARK_EXPORT_CA_FILE", "/etc/bulwark/siem-ca.pem")
    export = ExportSettings.from_env()
    assert (export.name, export.format, export.topics) == ("splunk", "cef", ("mail.verdicts", "quarantine.events"))
    assert str(export.ca_file) == "/etc/bulwark/siem-ca.pem"
    validate(export)


@pytest.mark.parametrize("change, complaint", [
    ({"format": "leef"}, "format"),
    ({"name": "a b"}, "name"),
    ({"topics": ("mail.verdict",)}, "mail.verdict"),
    ({"to": "udp://siem:514"}, "destination"),
    ({"to": "tls://siem:x"}, "destination"),
    ({"facility": "local9"}, "facility"),
    ({"start": "now"}, "start"),
])
def test_wrong_settings_are_named(change, complaint):
    from dataclasses import replace

    with pytest.raises(ValueError, match=complaint):
        validate(replace(ExportSettings(), **change))


def test_tls_destinations():
    assert parse_tls_destination("tls://siem.example.test") == ("siem.example.test", 6514)
    assert parse_tls_destination("tls://10.0.0.5:10514") == ("10.0.0.5", 10514)
    assert parse_tls_destination("tls://[2001:db8::5]:6514") == ("2001:db8::5", 6514)


def test_to_a_collector_ecs_and_cef_travel_inside_rfc5424():
    verdict = records()[12]
    for fmt in ("ecs", "cef"):
        to_file = renderer(ExportSettings(format=fmt, to="/var/log/bulwark/siem.log"), "gw")(verdict).decode()
        to_collector = renderer(ExportSettings(format=fmt, to="tls://siem:6514"), "gw")(verdict).decode()
        assert to_collector.startswith("<132>1 ") and to_collector.endswith("] " + to_file)
    syslog_line = renderer(ExportSettings(format="syslog", to="tls://siem:6514"), "gw")(verdict).decode()
    assert renderer(ExportSettings(format="syslog", to="-"), "gw")(verdict).decode() == syslog_line
    assert json.loads(renderer(ExportSettings(format="ecs"), "gw")(verdict))["event"]["id"] == verdict.event_id


# -- commit after write ---------------------------------------------------------------------------


class FakeMessage:
    def __init__(self, record):
        value, headers = codec.encode(record.event)
        self._args = (record.topic, record.partition, record.offset, record.key.encode(), value, headers)

    def error(self):
        return None

    def topic(self):
        return self._args[0]

    def partition(self):
        return self._args[1]

    def offset(self):
        return self._args[2]

    def key(self):
        return self._args[3]

    def value(self):
        return self._args[4]

    def headers(self):
        return self._args[5]

    def timestamp(self):
        return confluent_kafka.TIMESTAMP_CREATE_TIME, 1796030100123


class FakeConsumer:
    """Hands out fixed batches, then sets ``stop``; records every commit."""

    def __init__(self, batches, stop, log):
        self.batches, self.stop, self.log = list(batches), stop, log

    def subscribe(self, topics, on_assign=None):
        pass

    def consume(self, num_messages, timeout):
        if not self.batches:
            self.stop.set()
            return []
        return self.batches.pop(0)

    def commit(self, offsets, asynchronous):
        self.log.append(("commit", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)))

    def close(self):
        self.log.append(("close",))


class FlakyOutput:
    def __init__(self, log, failures: int):
        self.log, self.failures = log, failures

    def write(self, payloads):
        if self.failures:
            self.failures -= 1
            self.log.append(("failed", len(payloads)))
            raise OutputError("collector away")
        self.log.append(("written", len(payloads)))

    def close(self):
        pass


def _exporter(batches, output_failures: int, log):
    stop = threading.Event()
    export = ExportSettings(format="ecs")
    exporter = Exporter(Settings.from_env(), export, FlakyOutput(log, output_failures), renderer(export, "gw"), stop)
    exporter.consumer = lambda: FakeConsumer(batches, stop, log)
    return exporter, stop


def test_offsets_are_committed_only_after_the_batch_is_written(monkeypatch):
    monkeypatch.setattr("sinks.export.MAX_BACKOFF_SECONDS", 0.01)
    sessions = [r for r in records() if r.topic == "smtp.sessions"]
    log = []
    exporter, _ = _exporter([[FakeMessage(r) for r in sessions[:4]], [FakeMessage(sessions[4])]], 2, log)
    exporter.stop.wait = lambda delay: False  # no real back-off in a unit test
    exporter.run()
    assert log == [
        ("failed", 4), ("failed", 4), ("written", 4),
        ("commit", [("smtp.sessions", p, o + 1) for p, o in sorted((r.partition, r.offset) for r in sessions[:4])]),
        ("written", 1), ("commit", [("smtp.sessions", sessions[4].partition, sessions[4].offset + 1)]),
        ("close",),
    ]
    assert exporter.exported == 5


def test_stopping_while_the_destination_is_away_commits_nothing():
    log = []
    exporter, stop = _exporter([[FakeMessage(records()[0])]], 10, log)
    exporter.stop.wait = lambda delay: True  # told to stop during the back-off
    exporter.run()
    assert log == [("failed", 1), ("close",)]


def test_an_export_fenced_by_another_of_the_same_name_stops():
    log = []
    exporter, _ = _exporter([[FakeMessage(records()[0])]], 0, log)
    consumer = FakeConsumer([[FakeMessage(records()[0])]], exporter.stop, log)

    def fenced(offsets, asynchronous):
        raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(confluent_kafka.KafkaError.FENCED_INSTANCE_ID))

    consumer.commit = fenced
    exporter.consumer = lambda: consumer
    with pytest.raises(confluent_kafka.KafkaException):
        exporter.run()
    assert log == [("written", 1), ("close",)]


def test_a_commit_lost_to_a_rebalance_is_logged_and_the_export_goes_on():
    log = []
    exporter, _ = _exporter([[FakeMessage(records()[0])], [FakeMessage(records()[6])]], 0, log)
    consumer = FakeConsumer(exporter.consumer().batches, exporter.stop, log)
    commits = []

    def rebalanced(offsets, asynchronous):
        commits.append(offsets)
        if len(commits) == 1:
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(
                confluent_kafka.KafkaError.REBALANCE_IN_PROGRESS))

    consumer.commit = rebalanced
    exporter.consumer = lambda: consumer
    exporter.run()
    assert len(commits) == 2 and exporter.exported == 2

"""SIEM exports against the real stack: every event arrives, in order, through a SIGKILL.

Two exports run as their own processes, as an administrator would run them:
ECS JSON lines to a file, and RFC 5424 syslog over TLS to a collector in
this test (tests/syslog_collector.py, with a certificate of a private CA that
the exporter validates). Mail goes through the gateway from 127.0.7.x. The
collector stalls, so the syslog export holds a batch it wrote but could not
have acknowledged; then both exports are killed with SIGKILL while mail keeps
coming, and started again under the same names. Every record on the audit
topics must be found in both outputs: none missing, and each partition in
offset order except for one step back where the restart resent what had
not been committed (the stalled batch: so the collector has duplicates).
Records of one key share a partition, so that is "in order per key", and
stricter.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict

import pytest

from bulwark.devstack import free_port
from bulwark.cli.stats import scrape
from schemas.topics import ALL_TOPICS

from tests.outbound_servers import Authority
from tests.syslog_collector import Collector

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

AUDIT_TOPICS = [spec.name for spec in ALL_TOPICS if spec.kind == "audit"]
CLIENT_IPS = [f"127.0.7.{n}" for n in range(1, 13)]
KAFKA_SD = re.compile(r'\[kafka@32473 topic="([^"]+)" partition="(\d+)" offset="(\d+)"')
EVENT_ID_SD = re.compile(r'\[bulwark@32473 event_id="([0-9a-f]+)"')

Position = tuple[str, int, int]  # topic, partition, offset


def send(gateway, numbers, tag: str) -> list[str]:
    ids = []
    for n in numbers:
        msg = gateway.message(f"siem{n}@partner.test", [f"siem{n}@{LOCAL_DOMAIN}"], f"{tag} #{n:02d}")
        ids.append(gateway.send(msg, source_ip=CLIENT_IPS[n % len(CLIENT_IPS)]))
    return ids


def file_records(path) -> list[tuple[Position, str]]:
    if not path.exists():
        return []
    out = []
    # The last piece is "" after a complete line, or a line still being written.
    for line in path.read_bytes().split(b"\n")[:-1]:
        doc = json.loads(line)  # a torn line would fail here: the exporter cuts it before writing again
        kafka = doc["bulwark"]["kafka"]
        out.append(((kafka["topic"], kafka["partition"], kafka["offset"]), doc["event"]["id"]))
    return out


def syslog_records(collector: Collector) -> list[tuple[Position, str]]:
    out = []
    for message in collector.received():
        text = message.decode("utf-8")
        assert re.match(r"<\d{1,3}>1 ", text), text[:80]
        topic, partition, offset = KAFKA_SD.search(text).groups()
        out.append(((topic, int(partition), int(offset)), EVENT_ID_SD.search(text).group(1)))
    return out


def check_complete_and_in_order(name: str, got: list[tuple[Position, str]], topics: dict[Position, str],
                                restarts: int) -> int:
    """Every record on the topics is in ``got`` with its event id; each partition in order but for
    at most ``restarts`` steps back. Returns how many records were written twice."""
    seen = {position for position, _ in got}
    missing = sorted(set(topics) - seen)
    assert not missing, f"{name}: {len(missing)} records never exported, e.g. {missing[:5]}"
    for position, event_id in got:
        if position in topics:
            assert topics[position] == event_id, f"{name}: {position} exported with another event's id"
    order: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, offset in sorted(topics):
        order[(topic, partition)].append(offset)
    index = {(t, p, o): i for (t, p), offsets in order.items() for i, o in enumerate(offsets)}
    last: dict[tuple[str, int], int] = {}
    rewinds: dict[tuple[str, int], int] = defaultdict(int)
    for position, _ in got:
        if position not in index:  # written after the snapshot of the topics
            continue
        tp, i = position[:2], index[position]
        previous = last.get(tp, -1)
        if i <= previous:
            rewinds[tp] += 1  # the restart resending from its last commit
            assert rewinds[tp] <= restarts, f"{name}: {tp} went back {rewinds[tp]} times with {restarts} restart(s)"
        else:
            assert i == previous + 1, f"{name}: {tp} skipped from offset {order[tp][previous]} to {position[2]}"
        last[tp] = i
    return len(got) - len(seen)


def test_exports_survive_sigkill_with_nothing_lost_and_each_key_in_order(gateway, tmp_path):
    authority = Authority(tmp_path / "ca")
    # A small receive buffer: a stalled collector stops acknowledging after a few kilobytes.
    collector = Collector(authority.context("127.0.0.1"), receive_buffer=4096).start()
    ecs_file = tmp_path / "siem" / "bulwark.jsonl"
    run = uuid.uuid4().hex[:8]
    exports = {
        # Two exports on one host: each serves its metrics on a port of its own.
        "export-ecs": ["sinks", "export", "--name", f"it-ecs-{run}", "--format", "ecs", "--to", str(ecs_file),
                       "--metrics-port", str(free_port())],
        "export-syslog": ["sinks", "export", "--name", f"it-syslog-{run}", "--format", "syslog",
                          "--metrics-port", str(free_port()),
                          "--to", f"tls://127.0.0.1:{collector.port}", "--ca-file", str(authority.ca_file),
                          "--hostname", "gateway.example.test"],
    }
    stack = gateway.stack
    try:
        for name, args in exports.items():
            stack.start(name, args)
        first = send(gateway, range(0, 12), "siem export")

        # Both are consuming: the first batch's messages are reaching them.
        deadline = time.monotonic() + 90
        while not (any(p[0] == "mail.received" for p, _ in file_records(ecs_file))
                   and any(p[0] == "mail.received" for p, _ in syslog_records(collector))):
            for name in exports:
                assert stack.procs[name].poll() is None, f"{name} exited:\n{stack.log_tail(name, 40)}"
            assert time.monotonic() < deadline, "the exports wrote nothing in 90 s:\n" + "\n".join(
                stack.log_tail(name, 40) for name in exports)
            time.sleep(0.2)

        # The collector stalls while mail keeps coming: the syslog export writes a
        # batch that the collector's TCP does not acknowledge, so it cannot commit it.
        collector.pause()
        second = send(gateway, range(12, 24), "siem export")
        deadline, pending = time.monotonic() + 30, -1
        while pending == 0 or pending != collector.pending_bytes():
            assert time.monotonic() < deadline, "the syslog export sent nothing to the stalled collector"
            pending = collector.pending_bytes()
            time.sleep(1)

        # Both exports die without any chance to clean up, the file's mid-stream
        # (mail is still flowing), the syslog one with its batch unacknowledged.
        sender = threading.Thread(target=lambda: second.extend(send(gateway, range(24, 30), "siem export")))
        sender.start()
        before = {"export-ecs": len(file_records(ecs_file)), "export-syslog": len(collector.received())}
        for name in exports:
            stack.procs[name].kill()
            stack.procs[name].wait()
        # What the dead export's kernel still had goes through, then its connection ends.
        collector.resume()
        collector.wait_idle(60)
        sender.join(120)
        assert len(second) == 18

        for name, args in exports.items():  # same names: the same consumer groups, from their commits
            stack.procs.pop(name)
            stack.start(name, args)

        for n in range(30):
            gateway.downstream.wait_for(lambda d, n=n: f"siem export #{n:02d}" in d.text, timeout=120,
                                        what=f"delivery of siem export #{n:02d}")
        gateway.wait_records(lambda r: r.event.TYPE == "delivery.attempted", ["mail.deliveries"],
                             keys=set(first + second), what="delivery attempts")
        topics = {(r.topic, r.partition, r.offset): r.event.event_id for r in gateway.records(AUDIT_TOPICS)}
        assert {r for r in topics if r[0] == "mail.received"}, "nothing on mail.received"

        outputs = {"export-ecs": lambda: file_records(ecs_file), "export-syslog": lambda: syslog_records(collector)}
        duplicates = {}
        deadline = time.monotonic() + 120
        for name, read in outputs.items():
            while not set(topics) <= {p for p, _ in read()}:
                assert stack.procs[name].poll() is None, f"{name} exited:\n{stack.log_tail(name, 40)}"
                assert time.monotonic() < deadline, (
                    f"{name}: {len(set(topics) - {p for p, _ in read()})} of {len(topics)} records still "
                    f"missing after 120 s:\n{stack.log_tail(name, 40)}")
                time.sleep(0.3)
            duplicates[name] = check_complete_and_in_order(name, read(), topics, restarts=1)
            print(f"{name}: {len(topics)} records on the topics; {before[name]} written before the SIGKILL, "
                  f"{duplicates[name]} written twice after the restart")
        # The unacknowledged batch reached the collector after all, and was sent
        # again from the last commit: at least once means exactly this.
        assert duplicates["export-syslog"] > 0
    finally:
        for name in exports:
            stack.stop(name)
        collector.stop()


def test_a_second_export_with_the_same_name_fences_the_first(gateway, tmp_path):
    """Two processes of one export would interleave one file: the newer one wins, the older one exits."""
    stack = gateway.stack
    name = f"it-fence-{uuid.uuid4().hex[:8]}"
    first_file, second_file = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    args = ["sinks", "export", "--name", name, "--topic", "mail.received", "--to"]
    try:
        first = stack.start("export-first", [*args, str(first_file), "--metrics-port", str(free_port())])
        deadline = time.monotonic() + 60
        while not file_records(first_file):  # the session's earlier messages
            assert first.poll() is None, stack.log_tail("export-first", 40)
            assert time.monotonic() < deadline, stack.log_tail("export-first", 40)
            time.sleep(0.2)
        second_metrics = free_port()
        stack.start("export-second", [*args, str(second_file), "--metrics-port", str(second_metrics)])
        assert first.wait(60) != 0
        assert "fenced" in stack.log_tail("export-first", 40).lower()
        send(gateway, [40], "siem fence")  # only the second can export it now
        deadline = time.monotonic() + 60
        while not any(p[0] == "mail.received" for p, _ in file_records(second_file)):
            assert stack.procs["export-second"].poll() is None, stack.log_tail("export-second", 40)
            assert time.monotonic() < deadline, stack.log_tail("export-second", 40)
            time.sleep(0.2)
        # Its metrics: what it wrote, and how far behind the topic it is (nothing left once all is written).
        records = ("bulwark_export_records_total", (("export", name),))
        lag = ("bulwark_consumer_lag_records", (("group", f"bulwark-export-{name}"), ("topic", "mail.received")))
        deadline = time.monotonic() + 30
        while True:
            exported = scrape("export", f"http://127.0.0.1:{second_metrics}/metrics")
            assert exported.up, exported.error
            series = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in exported.series}
            # Counted once committed, a moment after the file has the record.
            if (series.get(records, 0) >= 1 and series.get(lag) == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert series[records] >= 1 and series[lag] == 0, series
    finally:
        stack.stop("export-first")
        stack.stop("export-second")

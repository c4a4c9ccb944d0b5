"""The safety net for messages answered 250 that no worker judged (sinks/unjudged.py), on the real stack.

The loss it closes is reproduced as chaos saw it: a worker that begins
``mail.received`` at the partition's end. Here the worker is stopped, a
message is accepted, the workers' group offsets are moved to the end of
``mail.received`` (what the worker was seen to do by itself), and the
worker started again: without the net the message would never be judged.

These restart the session's worker, so the file sorts with the other
worker tests, after the tests of other features.
"""

from __future__ import annotations

import time
import urllib.request

import confluent_kafka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulwark.kafka import consumer_config, producer_config
from schemas import codec
from schemas.events import MessageReceived, Verdict
from schemas.topics import RECEIVED, VERDICTS

from .conftest import LOCAL_DOMAIN
from .test_worker_failover import ensure_worker_running

pytestmark = pytest.mark.integration

#: The period in these tests (BULWARK_UNJUDGED_AFTER_SECONDS); the default is 120 s.
AFTER = 4.0
CLIENT_IP = "127.0.17.1"


def start_net(gateway, after: float | None) -> None:
    stack = gateway.stack
    stack.stop("unjudged")
    # Re-sends every few seconds while a worker restarts would give up soon: never here.
    stack.start("unjudged", ["sinks", "unjudged"],
                {"BULWARK_UNJUDGED_AFTER_SECONDS": str(after), "BULWARK_UNJUDGED_MAX_RESENDS": "100"} if after else {})


@pytest.fixture
def net(gateway):
    """The session's safety net with a short period; put back as it was afterwards."""
    start_net(gateway, AFTER)
    try:
        yield
    finally:
        ensure_worker_running(gateway)
        start_net(gateway, None)


def resent_total(gateway) -> float:
    url = f"http://127.0.0.1:{gateway.settings.metrics_port('unjudged')}/metrics"
    deadline = time.monotonic() + 60
    while True:
        try:
            text = urllib.request.urlopen(url, timeout=3).read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, f"the safety net serves no metrics at {url}"
            time.sleep(0.5)
    for family in text_string_to_metric_families(text):
        if family.name == "bulwark_unjudged_resent":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no bulwark_unjudged_resent_total")


def received_copies(gateway, message_id: str) -> list[dict[str, bytes]]:
    """The headers of every committed mail.received record of the message."""
    reader = confluent_kafka.Consumer(consumer_config(gateway.settings, "test-unjudged-reader",
                                                      **{"enable.partition.eof": True}))
    try:
        partitions = [confluent_kafka.TopicPartition(RECEIVED.name, p, confluent_kafka.OFFSET_BEGINNING)
                      for p in range(RECEIVED.partitions)]
        reader.assign(partitions)
        done, copies = set(), []
        deadline = time.monotonic() + 60
        while len(done) < len(partitions) and time.monotonic() < deadline:
            for msg in reader.consume(num_messages=500, timeout=1.0):
                if msg.error() is not None:
                    if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                    continue
                if msg.key() == message_id.encode():
                    copies.append(dict(msg.headers() or []))
        assert len(done) == len(partitions), "mail.received not read to its end"
        return copies
    finally:
        reader.close()


def verdicts_for(gateway, message_id: str) -> list[Verdict]:
    return [r.event for r in gateway.records([VERDICTS.name], {message_id}) if isinstance(r.event, Verdict)]


def move_workers_to_the_end(gateway) -> None:
    """Commit the end of every mail.received partition for the (empty) workers' group."""
    committer = confluent_kafka.Consumer(consumer_config(gateway.settings, "bulwark-streams"))
    try:
        ends = []
        for p in range(RECEIVED.partitions):
            _, high = committer.get_watermark_offsets(confluent_kafka.TopicPartition(RECEIVED.name, p), timeout=10)
            ends.append(confluent_kafka.TopicPartition(RECEIVED.name, p, high))
        deadline = time.monotonic() + 60
        while True:  # until the stopped worker's membership is gone
            try:
                committer.commit(offsets=ends, asynchronous=False)
                return
            except confluent_kafka.KafkaException as exc:
                assert time.monotonic() < deadline, f"the workers' group never became empty: {exc}"
                time.sleep(1)
    finally:
        committer.close()


def send(gateway, subject: str) -> str:
    msg = gateway.message("sender@partner.test", [f"someone@{LOCAL_DOMAIN}"], subject)
    return gateway.send(msg, source_ip=CLIENT_IP)


def delivered(gateway, subject: str) -> list:
    return gateway.downstream.matching(lambda d: f"Subject: {subject}" in d.text)


def test_a_message_no_worker_judged_is_judged_and_delivered_once(gateway, net):
    """The net is down meanwhile too: when it starts, it finds the message from its committed offsets."""
    subject = f"never judged {time.time()}"
    gateway.stack.stop("unjudged")
    gateway.stack.stop("streams")
    queue_id = send(gateway, subject)  # 250 at the inline-refusal deadline: no worker is there
    move_workers_to_the_end(gateway)
    gateway.stack.restart("streams")
    gateway.stack.restart("unjudged")

    gateway.downstream.wait_for(lambda d: f"Subject: {subject}" in d.text, timeout=180,
                                what="the delivery of the message the worker skipped")
    # Long enough for a second delivery, or a second copy, to have been made.
    time.sleep(4 * AFTER)
    assert len(delivered(gateway, subject)) == 1
    [verdict] = verdicts_for(gateway, queue_id)
    assert verdict.action == "deliver"
    copies = received_copies(gateway, queue_id)
    # The original, then one copy per period until the restarted worker judged one (it skips the rest).
    assert len(copies) >= 2
    assert [c.get(codec.HEADER_RESEND) for c in copies] == [None, *(str(n).encode() for n in range(1, len(copies)))]
    assert all(c[codec.HEADER_EVENT_ID] == copies[0][codec.HEADER_EVENT_ID] for c in copies)
    assert resent_total(gateway) == len(copies) - 1


def pending_waiting(gateway) -> float:
    url = f"http://127.0.0.1:{gateway.settings.metrics_port('unjudged')}/metrics"
    text = urllib.request.urlopen(url, timeout=3).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "bulwark_unjudged_pending_messages":
            return sum(s.value for s in family.samples if s.labels.get("state") == "waiting")
    return 0


def test_a_safety_net_killed_while_a_message_waits_sends_it_after_its_restart(gateway, net):
    """SIGKILL forgets nothing: its committed offsets stop at the message still waiting."""
    subject = f"waiting through a crash {time.time()}"
    gateway.stack.stop("streams")
    queue_id = send(gateway, subject)
    deadline = time.monotonic() + 60
    while pending_waiting(gateway) < 1:
        assert time.monotonic() < deadline, "the net never saw the message waiting"
        time.sleep(0.5)
    time.sleep(2 * AFTER)  # a commit or two, and a copy the worker will skip with the original
    gateway.stack.kill("unjudged")
    move_workers_to_the_end(gateway)
    gateway.stack.restart("streams")
    gateway.stack.restart("unjudged")

    gateway.downstream.wait_for(lambda d: f"Subject: {subject}" in d.text, timeout=180,
                                what="the delivery of the message waiting when the net was killed")
    time.sleep(4 * AFTER)
    assert len(delivered(gateway, subject)) == 1
    assert len(verdicts_for(gateway, queue_id)) == 1
    copies = received_copies(gateway, queue_id)
    # The count goes on from the copies written before the crash (read back with their header).
    assert [c.get(codec.HEADER_RESEND) for c in copies] == [None, *(str(n).encode() for n in range(1, len(copies)))]


def test_a_message_judged_in_time_is_never_sent_again(gateway, net):
    subject = f"judged in time {time.time()}"
    resent_before = resent_total(gateway)
    queue_id = send(gateway, subject)
    gateway.downstream.wait_for(lambda d: f"Subject: {subject}" in d.text, timeout=60)
    # Several periods: a copy would have been written by now.
    time.sleep(5 * AFTER)
    assert [c.get(codec.HEADER_RESEND) for c in received_copies(gateway, queue_id)] == [None]
    assert resent_total(gateway) == resent_before


def test_a_copy_of_a_judged_message_changes_nothing(gateway, net):
    """What makes re-sending safe: the worker that judged a message skips a copy of its record."""
    subject = f"copied {time.time()}"
    queue_id = send(gateway, subject)
    gateway.downstream.wait_for(lambda d: f"Subject: {subject}" in d.text, timeout=60)
    [original] = [r for r in gateway.records([RECEIVED.name], {queue_id}) if isinstance(r.event, MessageReceived)]
    value, headers = codec.encode(original.event)
    producer = confluent_kafka.Producer(producer_config(gateway.settings, "test-unjudged"))
    producer.produce(RECEIVED.name, key=queue_id.encode(), value=value,
                     headers=[*headers, (codec.HEADER_RESEND, b"1")], timestamp=original.event.timestamp_ms)
    assert producer.flush(10) == 0
    # The copy is read within a second; wait well past that for a second verdict or delivery.
    time.sleep(4 * AFTER)
    assert len(received_copies(gateway, queue_id)) == 2
    assert len(verdicts_for(gateway, queue_id)) == 1
    assert len(delivered(gateway, subject)) == 1

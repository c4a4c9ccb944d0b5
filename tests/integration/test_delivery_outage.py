"""A delivery that a broker outage or a crash interrupts is still sent once.

The delivery sink writes each attempt's outcome into its queue entry, with
the events still to publish (its outbox), and only then publishes them
(sinks/delivery.py, ``_settle``). tests/test_delivery_queue.py checks that
with a stand-in publisher; these interrupt the real thing: the session's
broker, stopped, and the sink's own process, killed with SIGKILL, while the
downstream holds its reply so that the interruption lands where it should.

Each test waits, before counting, long enough to have seen a second
delivery: it sends a probe message after the broker and the sink are back
(so the sink is consuming and delivering again), then waits past the test
policy's whole retry schedule (conftest.py: retries after 1 and 2 s, given
up after 6 s; the sink polls every 0.2 s).

The last two kill the sink after the downstream's 250 but before the
sink has finished with the message (waiting for the reply to QUIT, or for a
second domain's transaction): the sink writes each transaction's outcome as
soon as DATA is answered, so neither is sent again.

They stop Kafka and restart the sink that every other test uses, so they
leave both running, whatever happens here.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import time
from datetime import datetime

import pytest

from bulwark.devstack import KAFKA_SCRIPT
from schemas import codec
from schemas import events as ev
from schemas.events import utcnow
from schemas.topics import DELIVERIES
from sinks.store import JsonIndex

from .conftest import LOCAL_DOMAIN, TRUSTED_SERVER_IP

pytestmark = pytest.mark.integration

SINK = ["sinks", "delivery"]
#: Client addresses no other test uses (Dynamic Screening counts per address).
OUTAGE_IP = "127.0.0.80"
KILLED_WHILE_PUBLISHING_IP = "127.0.0.81"
KILLED_BEFORE_RECORDING_IP = "127.0.0.82"
PROBE_IP = "127.0.0.83"
#: Past the retry schedule (1 and 2 s), the give-up (6 s) and many polls (0.2 s).
SECOND_SEND_WINDOW = 10.0
#: The delivery sink waits this long for any SMTP reply (the test policy's
#: delivery.connect_timeout_seconds): a held 250 must be released sooner.
SINK_REPLY_TIMEOUT = 5.0


# -- the stack ----------------------------------------------------------------


def stop_kafka_quickly(gateway) -> float:
    """Stop the broker as test_resilience.py does (kafka.sh stop), SIGKILL
    after 2 s instead of 30: the sink is waiting for a held 250 meanwhile."""
    started = time.monotonic()
    subprocess.run(["bash", str(KAFKA_SCRIPT), "stop"], env={**gateway.stack.env, "BULWARK_KAFKA_STOP_TIMEOUT": "2"},
                   capture_output=True, check=False)
    return time.monotonic() - started


def kill_sink(gateway) -> None:
    sink = gateway.stack.procs.pop("delivery")
    os.killpg(sink.pid, signal.SIGKILL)
    sink.wait()


def ensure_running(gateway) -> None:
    """The broker and the delivery sink, for the tests after these."""
    gateway.stack.start_kafka()  # no-op when running
    sink = gateway.stack.procs.get("delivery")
    if sink is None or sink.poll() is not None:
        gateway.stack.start("delivery", SINK)


def sink_log_mark(gateway) -> int:
    path = gateway.stack.log_dir / "delivery.log"
    return path.stat().st_size if path.exists() else 0


def wait_sink_log(gateway, mark: int, text: str, timeout: float) -> str:
    """The sink's log since ``mark``, once it holds ``text``."""
    path = gateway.stack.log_dir / "delivery.log"
    deadline = time.monotonic() + timeout
    while True:
        with path.open("rb") as log:
            log.seek(mark)
            new = log.read().decode(errors="replace")
        if text in new:
            return new
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the delivery sink's log within {timeout:.0f}s; it logged:\n{new}")
        time.sleep(0.2)


def queue_entry(gateway, queue_id: str) -> dict | None:
    """The sink's queue entry as on disk, read beside the running sink (as the CLI does)."""
    index = JsonIndex(gateway.settings.data_dir / "delivery" / "queue", read_only=True)
    try:
        return index.get(queue_id)
    finally:
        index.close()


def wait_entry(gateway, queue_id: str, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        entry = queue_entry(gateway, queue_id)
        if entry is not None and predicate(entry):
            return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue entry of {queue_id} never showed {what} within {timeout:.0f}s: {entry}")
        time.sleep(0.1)


def outbox_types(entry: dict) -> list[str]:
    """The events the entry holds for Kafka (recorded, not yet acknowledged)."""
    return [codec.decode(encoded.encode()).TYPE for encoded in entry["outbox"]]


# -- what happened ------------------------------------------------------------


def attempts(gateway, queue_id: str) -> list[ev.DeliveryAttempted]:
    return [r.event for r in gateway.records([DELIVERIES.name], keys={queue_id})
            if isinstance(r.event, ev.DeliveryAttempted)]


def copies(gateway, subject: str, rcpt: str | None = None) -> int:
    return len(gateway.downstream.matching(lambda d: subject in d.text and (rcpt is None or rcpt in d.rcpt_to)))


def wait_attempt_published(gateway, queue_id: str, timeout: float = 120) -> None:
    """Until the delivery.attempted of ``queue_id`` is on the topic, starting
    again (as a service manager would) whatever stopped during the outage."""
    deadline = time.monotonic() + timeout
    while not attempts(gateway, queue_id):
        assert time.monotonic() < deadline, f"no delivery.attempted for {queue_id} within {timeout:.0f}s"
        gateway.stack.restart_exited()
        time.sleep(0.5)


def probe_then_wait(gateway, name: str) -> None:
    """A new message through the whole pipeline and out of the sink, then
    the retry schedule's length: a second send would have been seen."""
    subject = f"probe after {name}"
    msg = gateway.message("probe@partner.test", [f"probe-{name}@{LOCAL_DOMAIN}"], subject)
    deadline = time.monotonic() + 120
    while True:
        gateway.stack.restart_exited()
        try:
            gateway.send(msg, source_ip=PROBE_IP)
            break
        except (AssertionError, smtplib.SMTPException, OSError):  # 451 while ingest reconnects to the broker
            assert time.monotonic() < deadline, "ingest did not accept mail within 120s of Kafka coming back"
            time.sleep(1)
    while not copies(gateway, subject):
        assert time.monotonic() < deadline, "the probe was not delivered within 120s of Kafka coming back"
        gateway.stack.restart_exited()
        time.sleep(0.3)
    time.sleep(SECOND_SEND_WINDOW)


def assert_delivered_once_and_recorded_once(gateway, queue_id: str, subject: str, rcpt: str,
                                            created_after: datetime, created_before: datetime) -> None:
    assert copies(gateway, subject) == 1, f"the downstream received {copies(gateway, subject)} copies"
    published = attempts(gateway, queue_id)
    assert len(published) == 1, f"{len(published)} delivery.attempted for {queue_id}: {published}"
    [attempt] = published
    assert attempt.attempt == 1
    assert [(r.recipient, r.outcome, r.reply_code) for r in attempt.recipients] == [(rcpt, "delivered", 250)]
    # Made while the broker was down (or before the crash) and published
    # afterwards: it came out of the outbox, it is not a later attempt.
    assert created_after < attempt.occurred_at < created_before
    entry = queue_entry(gateway, queue_id)
    assert entry["done"] and entry["outbox"] == [] and entry["recipients"][rcpt]["state"] == "delivered"


# -- the tests ----------------------------------------------------------------


def test_kafka_stopped_during_delivery_sends_once_and_publishes_the_attempt_once(gateway):
    """The downstream's 250 comes while Kafka is down: the sink's publish of
    delivery.attempted fails, the queue still says delivered, and once the
    broker is back the same process publishes the recorded event, once."""
    rcpt, subject = f"held-outage@{LOCAL_DOMAIN}", "250 during a broker outage"
    hold = gateway.downstream.hold(rcpt, "DATA")
    sink = gateway.stack.procs["delivery"]
    queue_id = gateway.send(gateway.message("vera@partner.test", [rcpt], subject), source_ip=OUTAGE_IP)
    try:
        hold.wait_reached(60)  # the message is with the downstream, the sink waits for the 250
        mark = sink_log_mark(gateway)
        took = stop_kafka_quickly(gateway)
        outage_began = utcnow()
        hold.release()
        assert hold.answered.wait(2), (f"the sink stopped waiting for the 250 (it waits {SINK_REPLY_TIMEOUT:g}s; "
                                        f"Kafka took {took:.1f}s to stop)")

        # Recorded first: delivered, its event waiting in the outbox.
        entry = wait_entry(gateway, queue_id, lambda e: e["done"], 15, "the delivery recorded")
        assert entry["recipients"][rcpt]["state"] == "delivered"
        assert outbox_types(entry) == ["delivery.attempted"]
        # The publish failed: librdkafka gives up after message.timeout.ms
        # (twice the session's 5 s request timeout) and the sink says so.
        wait_sink_log(gateway, mark, "unpublished for now", timeout=45)
        assert outbox_types(queue_entry(gateway, queue_id)) == ["delivery.attempted"]
        # Longer than the retry schedule has passed: nothing was sent again.
        assert copies(gateway, subject) == 1
        assert sink.poll() is None, "the delivery sink exited during the outage"
    finally:
        hold.release()
        ensure_running(gateway)
    kafka_back = utcnow()

    wait_attempt_published(gateway, queue_id)
    # The process that recorded it published it (no restart needed).
    assert gateway.stack.procs["delivery"] is sink and sink.poll() is None
    probe_then_wait(gateway, "outage")
    assert_delivered_once_and_recorded_once(gateway, queue_id, subject, rcpt, outage_began, kafka_back)


def test_sink_killed_while_publishing_sends_once_and_publishes_once_after_restart(gateway):
    """SIGKILL after the downstream's 250 is recorded, while the publish of
    delivery.attempted is waiting for a broker that is down (so it cannot
    have reached Kafka): the restarted sink does not send again, and
    publishes the event from the outbox, once."""
    rcpt, subject = f"held-kill@{LOCAL_DOMAIN}", "250 then SIGKILL while publishing"
    hold = gateway.downstream.hold(rcpt, "DATA")
    queue_id = gateway.send(gateway.message("walt@partner.test", [rcpt], subject),
                            source_ip=KILLED_WHILE_PUBLISHING_IP)
    try:
        hold.wait_reached(60)
        took = stop_kafka_quickly(gateway)
        outage_began = utcnow()
        hold.release()
        assert hold.answered.wait(2), (f"the sink stopped waiting for the 250 (it waits {SINK_REPLY_TIMEOUT:g}s; "
                                        f"Kafka took {took:.1f}s to stop)")
        entry = wait_entry(gateway, queue_id, lambda e: e["done"], 15, "the delivery recorded")
        assert outbox_types(entry) == ["delivery.attempted"]
        kill_sink(gateway)
        killed_at = utcnow()
        assert outbox_types(queue_entry(gateway, queue_id)) == ["delivery.attempted"]
        gateway.stack.start_kafka()
        gateway.stack.start("delivery", SINK)

        wait_attempt_published(gateway, queue_id)
        probe_then_wait(gateway, "kill-while-publishing")
        assert_delivered_once_and_recorded_once(gateway, queue_id, subject, rcpt, outage_began, killed_at)
    finally:
        hold.release()
        ensure_running(gateway)


def test_sink_killed_right_after_the_250_does_not_send_again(gateway):
    """SIGKILL right after the downstream's 250, Kafka up: the downstream
    holds its reply to the QUIT that follows, and the sink dies waiting for
    it. The 250 was given, so the message must not be sent again.

    (Before the fix the outcome was written only after the reply to QUIT,
    so the restarted sink found the recipient pending and sent it again.)"""
    rcpt, subject = f"held-quit@{LOCAL_DOMAIN}", "250 then SIGKILL before QUIT"
    hold = gateway.downstream.hold(rcpt, "QUIT")
    queue_id = gateway.send(gateway.message("xena@partner.test", [rcpt], subject),
                            source_ip=KILLED_BEFORE_RECORDING_IP)
    try:
        hold.wait_reached(60)  # DATA answered 250; the sink waits for the 221
        assert copies(gateway, subject) == 1
        before = queue_entry(gateway, queue_id)
        kill_sink(gateway)
        hold.release()
        gateway.stack.start("delivery", SINK)
        probe_then_wait(gateway, "kill-before-quit")
        # Written down as soon as DATA was answered, before QUIT.
        assert before and before["recipients"][rcpt]["state"] == "delivered", before
        assert copies(gateway, subject) == 1, (
            f"the downstream received {copies(gateway, subject)} copies; when the sink was killed after "
            f"the 250, its queue entry said {before and before['recipients']}")
    finally:
        hold.release()
        ensure_running(gateway)


def test_sink_killed_during_a_second_domains_transaction_does_not_resend_the_first(gateway):
    """One message to two domains is two SMTP transactions. The first
    domain's 250 is in; SIGKILL while the second's DATA waits for its reply
    (a slow server: the sink waits up to its reply timeout, per route). The
    first domain must not get the message again.

    (Before the fix ``deliver`` wrote the queue entry once, after the
    transactions of every domain.)"""
    local, external = f"two-domains@{LOCAL_DOMAIN}", "two-domains@partner.test"
    subject = "two domains, SIGKILL during the second"
    hold = gateway.downstream.hold(external, "DATA")
    sender = f"yusuf@{LOCAL_DOMAIN}"  # outbound, from the domain mail server, through the smarthost
    gateway.send(gateway.message(sender, [local, external], subject), source_ip=TRUSTED_SERVER_IP)
    try:
        hold.wait_reached(60)
        assert copies(gateway, subject, local) == 1
        kill_sink(gateway)
        gateway.stack.start("delivery", SINK)
        probe_then_wait(gateway, "kill-between-domains")
        assert copies(gateway, subject, external) == 1
        assert copies(gateway, subject, local) == 1, f"{local} received {copies(gateway, subject, local)} copies"
    finally:
        hold.release()
        ensure_running(gateway)


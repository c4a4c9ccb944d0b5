"""What a client sees when the gateway cannot make a message durable."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

import pytest

from bulwark.devstack import wait_for_port
from schemas import events as ev
from schemas.topics import RECEIVED

from .conftest import LOCAL_DOMAIN, free_port

pytestmark = pytest.mark.integration


def _data_reply(gateway, msg, port=None):
    with smtplib.SMTP(gateway.settings.smtp_host, port or gateway.settings.smtp_port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail(msg["From"])
        client.rcpt(msg["To"])
        return client.data(msg.as_bytes())


def test_kafka_down_gives_451_and_mail_flows_again_when_it_is_back(gateway):
    lost = gateway.message("olga@partner.test", [f"pat@{LOCAL_DOMAIN}"], "during the outage")
    gateway.stack.stop_kafka()
    try:
        code, reply = _data_reply(gateway, lost)
        assert code == 451, reply
        assert b"try again later" in reply
    finally:
        gateway.stack.start_kafka()

    # The same gateway process, not restarted, accepts mail again.
    ingest = gateway.stack.procs["ingest"]
    after = gateway.message("olga@partner.test", [f"pat@{LOCAL_DOMAIN}"], "after the outage")
    deadline = time.monotonic() + 90
    while True:
        # As a service manager would (make run does the same), start again
        # whatever stopped itself during the outage.
        gateway.stack.restart_exited()
        code, reply = _data_reply(gateway, after)
        if code == 250 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert code == 250, reply
    assert gateway.stack.procs["ingest"] is ingest and ingest.poll() is None
    deadline = time.monotonic() + 120
    while not gateway.downstream.matching(lambda d: "after the outage" in d.text):
        assert time.monotonic() < deadline, "no delivery within 120s of Kafka coming back"
        gateway.stack.restart_exited()
        time.sleep(1)

    # Nothing was half-recorded: the refused message is on no topic, so the
    # client's retry will be its only copy.
    received = [r.event for r in gateway.records([RECEIVED.name]) if isinstance(r.event, ev.MessageReceived)]
    assert lost["Message-ID"] not in {e.header_message_id for e in received}
    assert after["Message-ID"] in {e.header_message_id for e in received}
    assert not gateway.downstream.matching(lambda d: "during the outage" in d.text)



def test_blob_store_unavailable_gives_451(gateway, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the blob store should be")
    port = free_port()
    # Only an inbound listener: the session's ingest holds the submission, MTA-STS and metrics ports (0 leaves them off).
    env = {**gateway.stack.env, "BULWARK_SMTP_PORT": str(port), "BULWARK_BLOB_DIR": str(blocker / "blobs"),
           "BULWARK_SUBMISSION_PORT": "0", "BULWARK_SUBMISSIONS_PORT": "0", "BULWARK_MTA_STS_PORT": "0",
           "BULWARK_INGEST_METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "bulwark.cli", "ingest"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        msg = gateway.message("quinn@partner.test", [f"rob@{LOCAL_DOMAIN}"], "no disk")
        code, reply = _data_reply(gateway, msg, port=port)
        assert code == 451
        received = [r.event for r in gateway.records([RECEIVED.name]) if isinstance(r.event, ev.MessageReceived)]
        assert msg["Message-ID"] not in {e.header_message_id for e in received}
    finally:
        proc.terminate()
        proc.wait(20)

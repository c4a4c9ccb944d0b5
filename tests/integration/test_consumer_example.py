"""The example consumer of the consumer guide (examples/siem_consumer.py), run against the real stack.

It runs as a SIEM engineer would run it, for a few seconds in a group of its
own, and must print the events of a message sent through the gateway: so
the example in the guide never rots.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "siem_consumer.py"


def test_the_example_consumer_prints_a_messages_events(gateway):
    msg = gateway.message("example-consumer@partner.test", [f"siem-reader@{LOCAL_DOMAIN}"], "consumer example")
    queue_id = gateway.send(msg, source_ip="127.0.7.40")

    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--bootstrap", gateway.settings.kafka_bootstrap,
         "--group", f"it-example-{uuid.uuid4().hex[:8]}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    wanted = {"message.received", "message.verdict", "delivery.attempted"}

    def complete() -> bool:
        printed = list(lines)
        ours = {e["type"]: e for e in printed if e["message_id"] == queue_id}
        if not wanted <= set(ours):
            return False
        # The session that carried it, on smtp.sessions under the client's address.
        session = ours["message.received"]["session_id"]
        return {e["type"] for e in printed if e["session_id"] == session} >= {"session.connected", "session.rcpt"}

    try:
        deadline = time.monotonic() + 60
        while not complete():
            assert proc.poll() is None, f"the example exited {proc.returncode}:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, f"the example printed no {wanted} for {queue_id} in 60 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert proc.returncode == 0, proc.stderr.read()

    ours = {e["type"]: e for e in lines if e["message_id"] == queue_id}
    assert ours["message.received"]["what"].startswith(
        f"received <example-consumer@partner.test> -> siem-reader@{LOCAL_DOMAIN}")
    assert ours["message.received"]["topic"] == "mail.received" and ours["message.received"]["key"] == queue_id
    assert ours["message.verdict"]["what"].startswith("deliver")
    assert "delivered" in ours["delivery.attempted"]["what"]
    [rcpt] = [e for e in lines if e["type"] == "session.rcpt" and e["session_id"] == ours["message.received"]["session_id"]]
    assert rcpt["key"] == "127.0.7.40" and rcpt["what"] == f"RCPT siem-reader@{LOCAL_DOMAIN} accepted"

"""Two ingest processes and two Faust workers, as `bulwark up` starts them
with BULWARK_INGEST_PROCESSES=2 (or auto, on two cores).

Two ingest processes share the SMTP port (SO_REUSEPORT), each with its own
transactional id; two workers share the partitions. A stack of its own (not
the session's gateway, which runs one of each so other tests can kill "the"
ingest), with a real broker and clamd.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from bulwark.devstack import LocalStack, environment, free_port, private_environment, wait_for_port
from bulwark.settings import Settings

from .downstream import start_downstream

pytestmark = pytest.mark.integration

CLIENTS = [f"127.0.14.{n}" for n in range(1, 11)]


def _listeners(port: int) -> set[int]:
    """The pids listening on a TCP port, as ss reports them."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def _send(port: int, client: str, n: int) -> str:
    msg = EmailMessage()
    msg["From"] = f"sender{n}@partner.test"
    msg["To"] = f"user{n}@example.test"
    msg["Subject"] = f"per-core {n}"
    msg["Message-ID"] = make_msgid(domain="partner.test")
    msg.set_content(f"message {n} of the per-core test\n")
    with smtplib.SMTP("127.0.0.1", port, source_address=(client, 0), timeout=60) as smtp:
        smtp.send_message(msg)
    return msg["Message-ID"]


def _copies(downstream, ids: list[str]) -> dict[str, int]:
    texts = [d.text for d in downstream.matching(lambda d: True)]
    return {i: sum(i in t for t in texts) for i in ids}


def _wait_all(downstream, ids: list[str], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while min(_copies(downstream, ids).values()) == 0:
        missing = [i for i, n in _copies(downstream, ids).items() if n == 0]
        assert time.monotonic() < deadline, f"{what}: {len(missing)} never delivered"
        time.sleep(0.3)


@pytest.fixture
def per_core_stack(tmp_path):
    downstream_port = free_port()
    downstream, controller = start_downstream(downstream_port)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
hostname: gateway.example.test
local_domains: [example.test]
mail_servers:
  - name: downstream
    host: 127.0.0.1
    port: {downstream_port}
    default: true
    trusted_addresses: [127.0.0.10/32]
delivery:
  smarthost: 127.0.0.1:{downstream_port}
""")
    env = {**private_environment(tmp_path, policy), "BULWARK_INGEST_PROCESSES": "2", "BULWARK_STREAMS_WORKERS": "2",
           "BULWARK_DELIVERY_POLL_SECONDS": "0.2"}
    with environment(env):
        settings = Settings.from_env()
        stack = LocalStack.from_settings(settings)
        try:
            stack.start_kafka()
            stack.start_clamd()
            stack.ensure_topics()
            stack.start_components(only=("ingest", "streams", "delivery", "quarantine"))
            yield settings, stack, downstream
        finally:
            stack.stop_all()
            controller.stop()


def test_two_ingest_processes_share_the_port_and_each_message_arrives_once(per_core_stack):
    settings, stack, downstream = per_core_stack
    assert [name for name, *_ in stack.instances() if name.startswith(("ingest", "streams"))] == [
        "streams", "streams-2", "ingest", "ingest-2"]
    # Both processes listen on the SMTP port (the second would fail to bind without SO_REUSEPORT).
    deadline = time.monotonic() + 60
    while _listeners(settings.smtp_port) != {stack.procs["ingest"].pid, stack.procs["ingest-2"].pid}:
        assert time.monotonic() < deadline, f"listeners: {_listeners(settings.smtp_port)}"
        time.sleep(0.5)

    ids = [_send(settings.smtp_port, CLIENTS[n % len(CLIENTS)], n) for n in range(30)]
    _wait_all(downstream, ids, "all 30 messages")

    # One ingest process killed: the port is still served by the other, and
    # the messages it accepts are delivered; nothing arrives twice.
    stack.procs["ingest-2"].kill()
    stack.procs["ingest-2"].wait()
    ids += [_send(settings.smtp_port, CLIENTS[n % len(CLIENTS)], n) for n in range(30, 40)]
    _wait_all(downstream, ids, "the 10 messages sent while ingest-2 was down")
    assert stack.restart_exited() == ["ingest-2"]
    wait_for_port(settings.smtp_host, settings.smtp_port, 60, stack.procs["ingest-2"])
    ids += [_send(settings.smtp_port, CLIENTS[n % len(CLIENTS)], n) for n in range(40, 50)]
    _wait_all(downstream, ids, "the messages after the restart")
    # Long enough for a second copy to have been delivered (retries every 0.2 s).
    time.sleep(5)
    copies = _copies(downstream, ids)
    assert set(copies.values()) == {1}, {i: n for i, n in copies.items() if n != 1}

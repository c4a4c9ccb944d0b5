"""Abusive clients against the real stack: a STARTTLS that never becomes TLS,
a silent implicit-TLS client, plaintext after STARTTLS, idle sessions under
stress; a normal client is served meanwhile. Clients come from 127.0.6.x."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from schemas import events as ev
from schemas.topics import SESSIONS

from .conftest import LOCAL_DOMAIN
from .policy_helpers import applied_policy

pytestmark = pytest.mark.integration

#: session_limits.tls_handshake_timeout_seconds's default, which the test stack keeps.
HANDSHAKE_TIMEOUT = 10


def raw(gateway, ip: str, port: int | None = None) -> socket.socket:
    sock = socket.create_connection((gateway.settings.smtp_host, port or gateway.settings.smtp_port), timeout=60,
                                    source_address=(ip, 0))
    return sock


def reply(sock: socket.socket) -> bytes:
    """One whole SMTP reply (the last line of a multi-line one)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return lines[-2]


def said_starttls(gateway, ip: str) -> socket.socket:
    sock = raw(gateway, ip)
    assert reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO stall.test\r\n")
    assert reply(sock).startswith(b"250 ")
    sock.sendall(b"STARTTLS\r\n")
    assert reply(sock).startswith(b"220 ")
    return sock


def seconds_until_closed(sock: socket.socket, started: float, limit: float = 60) -> float:
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_starttls_then_silence_is_dropped_after_the_handshake_timeout_and_others_are_served(gateway):
    stalled = said_starttls(gateway, "127.0.6.1")
    started = time.monotonic()
    # The implicit-TLS listener: a client that connects and never says hello.
    silent = raw(gateway, "127.0.6.2", gateway.settings.submissions_port)
    silent_started = time.monotonic()
    closed: dict[str, float] = {}
    watchers = [threading.Thread(target=lambda k=k, s=s, t=t: closed.__setitem__(k, seconds_until_closed(s, t)))
                for k, s, t in (("starttls", stalled, started), ("implicit", silent, silent_started))]
    for w in watchers:
        w.start()

    # Meanwhile a normal client is served, and the stalled ones are still open.
    msg = gateway.message("someone@partner.test", [f"abuse-probe@{LOCAL_DOMAIN}"], "served during a stall")
    gateway.send(msg, source_ip="127.0.6.3")
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT - 1 and not closed

    for w in watchers:
        w.join(70)
    # Not before the timeout (a handshake gets its full time), and not the
    # 60 seconds a silent client used to hold the connection for.
    assert HANDSHAKE_TIMEOUT - 0.5 < closed["starttls"] < HANDSHAKE_TIMEOUT + 5, closed
    assert HANDSHAKE_TIMEOUT - 0.5 < closed["implicit"] < HANDSHAKE_TIMEOUT + 5, closed
    stalled.close()
    silent.close()

    [tls] = [r.event for r in gateway.wait_records(lambda r: isinstance(r.event, ev.SessionStartTls), [SESSIONS.name],
                                                   keys={"127.0.6.1"}, what="STARTTLS event")]
    assert tls.outcome == "failure"
    gateway.wait_records(lambda r: isinstance(r.event, ev.SessionDisconnected), [SESSIONS.name],
                         keys={"127.0.6.1"}, what="disconnect event")


def test_starttls_then_plaintext_fails_at_once(gateway):
    sock = said_starttls(gateway, "127.0.6.4")
    started = time.monotonic()
    sock.sendall(b"MAIL FROM:<someone@partner.test>\r\n")
    assert seconds_until_closed(sock, started, limit=30) < 2
    sock.close()
    [tls] = [r.event for r in gateway.wait_records(lambda r: isinstance(r.event, ev.SessionStartTls), [SESSIONS.name],
                                                   keys={"127.0.6.4"}, what="STARTTLS event")]
    assert tls.outcome == "failure"


def closed_with(sock: socket.socket) -> bytes | None:
    """What the gateway said before closing the connection, or None while it is open."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except BlockingIOError:
        return None  # nothing more to read, and not closed
    except ConnectionResetError:
        pass
    return data.strip().splitlines()[-1] if data.strip() else b""


def test_under_stress_idle_sessions_are_closed_and_a_normal_client_is_served(gateway, tmp_path):
    stress = "session_limits: {stress_sessions: 4, stress_timeout_seconds: 3}\n"
    with applied_policy(gateway, tmp_path, stress):
        idle_ips = [f"127.0.6.{n}" for n in range(10, 18)]
        idle = [raw(gateway, ip) for ip in idle_ips]
        started = time.monotonic()
        for sock in idle:
            assert reply(sock).startswith(b"220 ")
        # A normal client talks while the idle ones sit there: served.
        msg = gateway.message("someone@partner.test", [f"abuse-probe@{LOCAL_DOMAIN}"], "served under stress")
        gateway.send(msg, source_ip="127.0.6.20")
        # Two stress timeouts (the second: how often an idle session is looked
        # at) and a margin, far short of the 300-second command timeout.
        time.sleep(max(0.0, started + 10 - time.monotonic()))
        outcome = {ip: closed_with(sock) for ip, sock in zip(idle_ips, idle)}
        closed = {ip: last for ip, last in outcome.items() if last is not None}
        # The idle sessions go until fewer than stress_sessions are open: then
        # the stress is over and the rest are left to the command timeout.
        assert len(closed) >= len(idle_ips) - 3, outcome
        assert all(last.startswith(b"421 4.4.2") for last in closed.values()), outcome
        for sock in idle:
            sock.close()
        refused = gateway.wait_records(
            lambda r: isinstance(r.event, ev.SessionRefused) and "(stress)" in r.event.reason, [SESSIONS.name],
            keys=set(closed), what="stress timeout events")
        assert {r.event.client_ip for r in refused} == set(closed)

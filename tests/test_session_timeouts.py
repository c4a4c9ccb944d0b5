"""Session timeouts: the command timeout, the stress timeout and the STARTTLS
handshake timeout, in their pure logic and on a real GatewaySMTP over
loopback sockets (in process, no broker: events go to a list)."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest

from bulwark.policy import PolicyError, parse
from bulwark.policy.runtime import PolicyHolder
from ingest.guards.limits import SessionTimeouts
from ingest.server import GatewaySMTP, IngestHandler
from ingest.tls import self_signed
from schemas import events as ev

BASE = """hostname: gw.example.com
local_domains: [example.com]
"""


def timeouts(extra: str = "") -> SessionTimeouts:
    return SessionTimeouts(parse(BASE + extra))


def test_defaults_are_the_rfc_and_postfix_values():
    limits = parse(BASE).session_limits
    assert limits.command_timeout_seconds == 300  # RFC 5321 4.5.3.2.7
    assert limits.stress_timeout_seconds == 10  # Postfix's smtpd_timeout under stress
    assert limits.tls_handshake_timeout_seconds == 10
    assert limits.stress_sessions == 1000


def test_a_stress_timeout_longer_than_the_command_timeout_is_refused():
    with pytest.raises(PolicyError, match="stress_timeout_seconds"):
        parse(BASE + "session_limits: {command_timeout_seconds: 30, stress_timeout_seconds: 60}\n")


def test_command_timeout_applies_whatever_the_load():
    t = timeouts()
    refusal = t.expired(since_command=300, since_line=0, waiting_for_client=False)
    assert refusal.reply.startswith("421 4.4.2 gw.example.com") and refusal.close
    assert refusal.reason == "session limit: no command for 300 seconds"
    assert t.expired(since_command=299, since_line=299, waiting_for_client=True) is None


def test_under_stress_a_client_that_keeps_the_gateway_waiting_is_closed():
    t = timeouts("session_limits: {stress_sessions: 3}\n")
    t.open = 2
    assert not t.under_stress
    assert t.expired(since_command=60, since_line=60, waiting_for_client=True) is None
    t.open = 3
    refusal = t.expired(since_command=60, since_line=10, waiting_for_client=True)
    assert refusal.code == 421 and "3 sessions open (stress)" in refusal.reason
    # A line (or a reply) recently, or the gateway busy with the reply: not idle.
    assert t.expired(since_command=60, since_line=9, waiting_for_client=True) is None
    assert t.expired(since_command=60, since_line=60, waiting_for_client=False) is None


def test_sessions_are_looked_at_again_soon_enough_to_notice_stress():
    t = timeouts()
    assert t.next_check(0) == 10
    assert t.next_check(3, since_line=3) == 7  # when it would reach the stress timeout
    assert t.next_check(30, since_line=30) == 10  # past it: again one stress timeout later
    assert t.next_check(295, since_line=1) == 5  # the command timeout comes first
    assert t.next_check(300) == 0.5


# -- on a real GatewaySMTP ----------------------------------------------------------


class Events:
    def __init__(self):
        self.emitted: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.emitted.append(event)


@pytest.fixture
def tls_context(tmp_path) -> ssl.SSLContext:
    cert, key = self_signed(tmp_path / "tls", "gw.example.com")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def start(policy_yaml: str, tls_context: ssl.SSLContext):
    policy = PolicyHolder(parse(BASE + policy_yaml))
    events = Events()
    handler = IngestHandler(policy, events, durable=None, blobs=None, guards=[])
    shared = SessionTimeouts(policy)
    server = await asyncio.get_running_loop().create_server(
        lambda: GatewaySMTP(handler, shared, hostname="gw.example.com", tls_context=tls_context),
        "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], events, shared


async def greeted(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220 ")
    return reader, writer


async def until_closed(reader: asyncio.StreamReader, within: float) -> tuple[float, bytes]:
    """Seconds until the gateway closes the connection, and what it said last."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), within)
    return time.monotonic() - started, data


async def starttls(port: int):
    reader, writer = await greeted(port)
    writer.write(b"EHLO client.test\r\n")
    while (await reader.readline())[3:4] != b" ":
        pass
    writer.write(b"STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"220 ")
    return reader, writer


async def test_starttls_then_silence_is_dropped_after_the_handshake_timeout(tls_context):
    server, port, events, shared = await start("session_limits: {tls_handshake_timeout_seconds: 1}\n", tls_context)
    async with server:
        reader, writer = await starttls(port)
        elapsed, _ = await until_closed(reader, 5)
        assert 0.9 < elapsed < 3
        writer.close()
        await asyncio.sleep(0.1)
        assert shared.open == 0
        [failed] = [e for e in events.emitted if isinstance(e, ev.SessionStartTls)]
        assert failed.outcome == "failure"
        assert any(isinstance(e, ev.SessionDisconnected) for e in events.emitted)


async def test_starttls_then_plaintext_fails_at_once(tls_context):
    server, port, events, shared = await start("", tls_context)
    async with server:
        reader, writer = await starttls(port)
        writer.write(b"MAIL FROM:<a@partner.test>\r\n")
        elapsed, data = await until_closed(reader, 5)
        assert elapsed < 1 and data == b""
        writer.close()


async def test_a_tls_session_keeps_a_small_read_buffer(tls_context, monkeypatch):
    from asyncio import sslproto

    from ingest.server import TLS_READ_BUFFER, bound_tls_buffers

    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", sslproto.SSLProtocol.max_size)
    bound_tls_buffers()
    server, port, events, shared = await start("", tls_context)
    # A TLS session another test left to the garbage collector may still be about.
    earlier = {id(p) for p in gc_objects(sslproto.SSLProtocol)}
    async with server:
        reader, writer = await starttls(port)
        await asyncio.sleep(0.1)
        [protocol] = [p for p in gc_objects(sslproto.SSLProtocol) if id(p) not in earlier]
        assert len(protocol._ssl_buffer) == TLS_READ_BUFFER == 64 * 1024  # not asyncio's 256 KiB
        writer.close()


def gc_objects(kind):
    import gc

    return [o for o in gc.get_objects() if isinstance(o, kind) and o._app_protocol is not None]


async def test_starttls_still_works(tls_context):
    server, port, events, shared = await start("session_limits: {tls_handshake_timeout_seconds: 1}\n", tls_context)
    async with server:
        reader, writer = await starttls(port)
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        await writer.start_tls(client)
        await asyncio.sleep(1.5)  # past the handshake timeout: it no longer applies
        writer.write(b"EHLO client.test\r\n")
        assert (await reader.readline()).startswith(b"250-")
        writer.close()


async def test_under_stress_idle_sessions_are_closed_until_the_stress_is_over(tls_context):
    policy = "session_limits: {stress_sessions: 3, stress_timeout_seconds: 1, command_timeout_seconds: 300}\n"
    server, port, events, shared = await start(policy, tls_context)
    async with server:
        # Two sessions: no stress; idle for longer than the stress timeout, still open.
        first = [await greeted(port) for _ in range(2)]
        await asyncio.sleep(2.5)
        assert shared.open == 2 and not any(isinstance(e, ev.SessionRefused) for e in events.emitted)
        # Two more: under stress until two of the four are gone; then no
        # longer, and the other two are left to the command timeout.
        sessions = [*first, await greeted(port), await greeted(port)]
        await asyncio.sleep(3.5)
        assert shared.open == 2
        refused = [e for e in events.emitted if isinstance(e, ev.SessionRefused)]
        assert len(refused) == 2 and all("(stress)" in e.reason and e.phase == "session" for e in refused)
        said = []
        for reader, writer in sessions:
            try:
                said.append(await asyncio.wait_for(reader.read(), 0.2))
            except asyncio.TimeoutError:
                writer.write(b"NOOP\r\n")  # still served
                assert (await reader.readline()).startswith(b"250")
        assert len(said) == 2 and all(s.startswith(b"421 4.4.2 gw.example.com") for s in said)
        for _, writer in sessions:
            writer.close()


async def test_under_stress_a_byte_at_a_time_is_not_progress(tls_context):
    policy = "session_limits: {stress_sessions: 2, stress_timeout_seconds: 2, command_timeout_seconds: 300}\n"
    server, port, events, shared = await start(policy, tls_context)
    async with server:
        talker_reader, talker = await greeted(port)
        reader, writer = await greeted(port)
        started = time.monotonic()
        closed = None
        for byte in b"EHLO slow.test\r\n":
            writer.write(bytes([byte]))
            # The talker sends a whole command within every stress timeout.
            talker.write(b"NOOP\r\n")
            assert (await talker_reader.readline()).startswith(b"250")
            try:
                data = await asyncio.wait_for(reader.read(100), 0.5)
            except asyncio.TimeoutError:
                continue
            closed = time.monotonic() - started
            assert data.startswith(b"421 4.4.2")
            break
        assert closed is not None and closed < 4.5
        assert not talker_reader.at_eof()
        talker.close()
        writer.close()


async def test_a_pipelining_client_does_not_hold_the_others(tls_context):
    policy = PolicyHolder(parse(BASE))
    handler = IngestHandler(policy, Events(), durable=None, blobs=None, guards=[])
    order: list[str] = []

    async def handle_NOOP(server, session, envelope, arg):
        order.append(arg)
        return "250 OK"

    handler.handle_NOOP = handle_NOOP  # aiosmtpd finds the hooks when a session starts
    server = await asyncio.get_running_loop().create_server(
        lambda: GatewaySMTP(handler, hostname="gw.example.com"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        bulk_reader, bulk = await greeted(port)
        other_reader, other = await greeted(port)
        # Both at once: the bulk client's 900 commands reach ingest in one read.
        bulk.write(b"".join(b"NOOP bulk\r\n" for _ in range(900)))  # within max_commands_per_session
        other.write(b"NOOP other\r\n")
        assert (await other_reader.readline()).startswith(b"250")
        for _ in range(900):
            assert (await bulk_reader.readline()).startswith(b"250")
        # Served between two of the bulk client's commands, not after all 900.
        assert order.index("other") < 450, order.index("other")
        bulk.close()
        other.close()

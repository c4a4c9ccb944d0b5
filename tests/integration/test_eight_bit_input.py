"""Bytes that are not UTF-8 in SMTP commands: a clear reply, an event on the
topic, and Dynamic Screening counting them like their ASCII twins.

Before this, such a command's session event could not be serialised and was
never published, so fifteen relay attempts with an 8-bit byte in the
recipient were refused but never counted, and the client was never banned.
The test policy bans after 20 failed RCPTs or 6 failed AUTH in 5 minutes.
"""

from __future__ import annotations

import base64
import socket

import pytest

from schemas import events as ev
from schemas.topics import SESSIONS

from .abuse_helpers import ban_on_topic, close_quietly, connect_refusal, submissions, wait_for

pytestmark = pytest.mark.integration


class RawClient:
    """An SMTP client that sends exactly the bytes it is given (smtplib encodes as ASCII)."""

    def __init__(self, gateway, ip: str):
        self.sock = socket.create_connection((gateway.settings.smtp_host, gateway.settings.smtp_port), timeout=30,
                                             source_address=(ip, 0))
        self.file = self.sock.makefile("rb")
        self.banner = self.reply()

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                break
            lines.append(line)
            if line[3:4] != b"-":
                break
        return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def session_events(gateway, ip: str, count: int, kind: type, predicate=lambda e: True) -> list:
    records = gateway.wait_records(lambda r: isinstance(r.event, kind) and predicate(r.event), [SESSIONS.name],
                                   keys={ip}, what=f"{kind.TYPE} events of {ip}")
    return [r.event for r in records][-count:]


def test_eight_bit_bytes_in_every_command_are_refused_and_recorded(gateway):
    ip = "127.0.0.71"
    client = RawClient(gateway, ip)
    assert client.banner.startswith(b"220")
    assert client.command(b"EHLO client\xff.test").startswith(b"501 5.5.2")
    assert client.command(b"HELO client\xfe.test").startswith(b"501 5.5.2")
    assert client.command(b"EHLO client.test").startswith(b"250")
    assert client.command(b"NOOP \xe9t\xe9").startswith(b"501 5.5.2")
    assert client.command(b"VRFY b\xf6b").startswith(b"501 5.5.2")
    assert client.command(b"AUTH PL\xc1IN").startswith(b"501 5.5.2")
    assert client.command(b"MAIL FROM:<s\xe4nder@partner.test>").startswith(b"501 5.1.7")
    # Valid UTF-8 (RFC 6531) is not what is refused here.
    assert client.command("MAIL FROM:<jürgen@partner.test> SMTPUTF8".encode()).startswith(b"250")
    assert client.command(b"RCPT TO:<victim\xff@elsewhere.test>").startswith(b"501 5.1.3")
    assert client.command(b"QUIT").startswith(b"221")
    client.close()

    [ehlo, helo] = session_events(gateway, ip, 2, ev.SessionRefused, lambda e: e.phase in ("EHLO", "HELO"))
    assert (ehlo.phase, ehlo.reply_code, ehlo.argument) == ("EHLO", 501, "client\\xff.test")
    assert helo.argument == "client\\xfe.test"
    assert {e.phase: e.argument for e in session_events(gateway, ip, 2, ev.SessionRefused,
                                                        lambda e: e.phase in ("NOOP", "VRFY"))} == {
        "NOOP": "\\xe9t\\xe9", "VRFY": "b\\xf6b"}
    [auth] = session_events(gateway, ip, 1, ev.SessionAuth)
    assert (auth.mechanism, auth.outcome) == ("PL\\xc1IN", "failure")
    [refused_mail, utf8_mail] = session_events(gateway, ip, 2, ev.SessionMail)
    assert (refused_mail.sender, refused_mail.accepted, refused_mail.reply_code) == ("s\\xe4nder@partner.test", False, 501)
    assert (utf8_mail.sender, utf8_mail.accepted) == ("jürgen@partner.test", True)
    [rcpt] = session_events(gateway, ip, 1, ev.SessionRcpt)
    assert (rcpt.recipient, rcpt.accepted, rcpt.reply_code) == ("victim\\xff@elsewhere.test", False, 501)


def test_relay_attempts_with_an_eight_bit_byte_are_counted_and_banned(gateway):
    ip = "127.0.0.72"
    client = RawClient(gateway, ip)
    client.command(b"EHLO guesser.test")
    assert client.command(b"MAIL FROM:<spammer@elsewhere.test>").startswith(b"250")
    for i in range(20):
        reply = client.command(b"RCPT TO:<victim%d\xff@elsewhere.test>" % i)
        assert reply.startswith(b"501 5.1.3") or reply.startswith(b"421"), reply
    client.close()

    ban = ban_on_topic(gateway, ip)
    assert ban.counters["failed_rcpt"] == 20
    # The ban is on the topic; ingest enforces it once its view has read it.
    refusal = wait_for("refused at connect", lambda: connect_refusal(gateway, ip), timeout=30)
    assert refusal is not None and refusal[0] == 421 and b"banned by Dynamic Screening" in refusal[1]


def test_credentials_that_are_not_utf8_count_as_password_guesses(gateway):
    ip = "127.0.0.73"
    client = submissions(gateway, ip)
    client.ehlo("guesser.test")
    for attempt in range(6):
        blob = base64.b64encode(b"\0alice@example.test\0Gr\xfc\xdf-" + str(attempt).encode()).decode()
        code, reply = client.docmd("AUTH", f"PLAIN {blob}")
        assert code in (501, 421), (code, reply)
    close_quietly(client)
    guesses = session_events(gateway, ip, 6, ev.SessionAuth)
    assert all(e.reason == ev.AUTH_NOT_UTF8_CREDENTIALS for e in guesses)
    assert ban_on_topic(gateway, ip).counters["failed_auth"] == 6
    # And the ban holds against a well-formed attempt too.
    # The ban is on the topic; ingest enforces it once its view has read it.
    refusal = wait_for("refused at connect", lambda: connect_refusal(gateway, ip), timeout=30)
    assert refusal is not None and refusal[0] == 421

"""SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, only ever over TLS,
and the other EHLO keywords that depend on TLS (REQUIRETLS, RFC 8689).

aiosmtpd's own AUTH calls a synchronous authenticator; Argon2 verification
(tens of milliseconds of CPU) and a verification source's bind would stall
every other session on the loop. So ``GatewaySMTP.smtp_AUTH`` hands the whole
command to :func:`smtp_auth` here, which reads the exchange, asks the
``on_auth`` guards (banned client, refused country, disabled account) and
then awaits the account directory, which verifies in a thread.

Every AUTH command is recorded as a ``session.auth`` event: mechanism, the
login name the client gave, outcome and why. The password and the base64
exchange are never kept, logged or recorded; the session keeps only the
verified account address (``session.auth_data.login``), which is what relay
control and the message's ``authenticated_user`` trust.
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingest import guards as guard_phases
from ingest.accounts import account_key
from schemas import events as ev

if TYPE_CHECKING:
    from ingest.server import GatewaySession, GatewaySMTP

log = logging.getLogger(__name__)

MECHANISMS = ("PLAIN", "LOGIN")

# Replies, from RFC 4954 section 6 unless noted.
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure; please try again later"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
# RFC 5248's code for it; the owner learns why instead of retrying passwords.
AUTH_DISABLED = "525 5.7.13 User account disabled; contact your administrator"
AUTH_NOT_OFFERED = "502 5.5.1 AUTH is not offered here; use the submission port"
AUTH_NEEDS_EHLO = "503 5.5.1 Send EHLO first"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH is not permitted during a mail transaction"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type; PLAIN and LOGIN are offered"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the response: base64 expected"
AUTH_BAD_PLAIN = "501 5.5.2 Malformed PLAIN response: authzid NUL authcid NUL password expected"
AUTH_BAD_UTF8 = "501 5.5.2 Login name and password must be UTF-8"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line too long"

#: Longest login accepted: an address is at most 254 octets (RFC 5321 4.5.3.1.3).
MAX_LOGIN = 254


@dataclass(frozen=True)
class AuthenticatedUser:
    """What the session keeps after AUTH: who, never how."""

    login: str
    mechanism: str


class _Failed(Exception):
    """The exchange ended without credentials; ``reply`` says why (None: client gone)."""

    def __init__(self, reply: str | None, reason: str):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def _policy(handler):
    return getattr(handler.policy, "current", handler.policy)


def listener_rules(handler):
    return getattr(_policy(handler).listeners, handler.listener)


#: The SMTP listeners, by the name their sessions record (SessionConnected.listener).
LISTENER_NAMES = ("inbound", "submission", "submissions")


def listener_ports(settings) -> list[tuple[str, int]]:
    """(listener, port) for each listener to start; a port of 0 leaves it off."""
    ports = {"inbound": settings.smtp_port, "submission": settings.submission_port,
             "submissions": settings.submissions_port}
    return [(name, ports[name]) for name in LISTENER_NAMES if ports[name]]


def ehlo_keywords(handler, session: "GatewaySession", responses: list[str]) -> list[str]:
    """The EHLO reply with AUTH and REQUIRETLS advertised as this listener and the session allow.

    aiosmtpd advertises its own AUTH line once TLS is up (and never on an
    implicit-TLS listener); it is replaced by ours, which follows the policy.
    """
    keywords = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")]
    if session.tls_version:
        if listener_rules(handler).auth:
            keywords.append("250-AUTH " + " ".join(MECHANISMS))
        if _policy(handler).tls.requiretls:
            keywords.append("250-REQUIRETLS")
    return [*keywords, responses[-1]]


REQUIRETLS_NEEDS_TLS = "555 5.5.4 REQUIRETLS is accepted only over TLS; use STARTTLS first"


def requiretls_refusal(policy, session: "GatewaySession", options: list[str]):
    """MAIL FROM ... REQUIRETLS is only valid where it was advertised (RFC 8689 section 4.1)."""
    policy = getattr(policy, "current", policy)
    if "REQUIRETLS" in options and not (session.tls_version and policy.tls.requiretls):
        return guard_phases.Refusal(REQUIRETLS_NEEDS_TLS, "REQUIRETLS without TLS")
    return None


async def _read_response(server: "GatewaySMTP", challenge: str) -> bytes:
    """Send a 334 challenge (already base64) and return the decoded answer."""
    await server.push(f"334 {challenge}")
    try:
        line = await server._reader.readline()
    except ValueError:  # longer than the reader's limit
        raise _Failed(AUTH_LINE_TOO_LONG, "exchange line too long") from None
    if not line:
        raise _Failed(None, "connection closed during AUTH")
    return _decode(line.strip())


def _decode(blob: bytes) -> bytes:
    if blob == b"*":
        raise _Failed(AUTH_CANCELLED, "cancelled by the client")
    if blob == b"=":  # RFC 4954: an empty initial response
        return b""
    try:
        return b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise _Failed(AUTH_BAD_BASE64, "malformed exchange") from None


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Failed(AUTH_BAD_UTF8, ev.AUTH_NOT_UTF8_CREDENTIALS) from None


async def _plain(server: "GatewaySMTP", initial: str | None) -> tuple[str, str]:
    response = _decode(initial.encode()) if initial is not None else await _read_response(server, "")
    parts = response.split(b"\x00")
    if len(parts) != 3:
        raise _Failed(AUTH_BAD_PLAIN, "malformed exchange")
    authzid, login, password = (_text(p) for p in parts)
    if authzid and account_key(authzid) != account_key(login):
        # Acting for another account (proxy authorization) is not offered.
        raise _Failed(AUTH_INVALID, "authorization identity not permitted")
    return login, password


async def _login(server: "GatewaySMTP", initial: str | None) -> tuple[str, str]:
    # "Username:" and "Password:", as the LOGIN mechanism's clients expect.
    login = _decode(initial.encode()) if initial is not None else await _read_response(server, "VXNlcm5hbWU6")
    password = await _read_response(server, "UGFzc3dvcmQ6")
    return _text(login), _text(password)


async def smtp_auth(server: "GatewaySMTP", arg: str) -> None:
    """The AUTH command: reply, record, and on success mark the session authenticated."""
    handler = server.handler
    session: "GatewaySession" = server.session
    args = arg.split() if arg else []
    mechanism = args[0].upper() if args else ""
    login: str | None = None

    def record(outcome: str, reason: str | None) -> None:
        handler.publisher.emit(ev.SessionAuth(
            session_id=session.id, client_ip=session.client_ip, mechanism=mechanism[:20],
            username=login[:MAX_LOGIN] if login is not None else None, outcome=outcome, reason=reason,
        ))

    async def refuse(reply: str | None, reason: str) -> None:
        record("failure", reason)
        if reply is not None:
            await server.push(reply)

    if not session.host_name or not session.extended_smtp:
        return await refuse(AUTH_NEEDS_EHLO, "no EHLO")
    if not listener_rules(handler).auth:
        return await refuse(AUTH_NOT_OFFERED, f"not offered on the {handler.listener} listener")
    if not session.tls_version:
        # Refused before reading any exchange: PLAIN and LOGIN would carry
        # the password in the clear.
        return await refuse(AUTH_NEEDS_TLS, "TLS required")
    if session.authenticated:
        return await refuse(AUTH_ALREADY, "already authenticated")
    if server.envelope is not None and server.envelope.mail_from is not None:
        return await refuse(AUTH_IN_TRANSACTION, "during a mail transaction")
    if not args or len(args) > 2:
        return await refuse(AUTH_SYNTAX, "syntax")
    if mechanism not in MECHANISMS:
        return await refuse(AUTH_UNKNOWN_MECHANISM, "unknown mechanism")

    initial = args[1] if len(args) == 2 else None
    try:
        login, password = await (_plain if mechanism == "PLAIN" else _login)(server, initial)
    except _Failed as failed:
        return await refuse(failed.reply, failed.reason)
    if not login or len(login) > MAX_LOGIN:
        return await refuse(AUTH_INVALID, ev.AUTH_INVALID_CREDENTIALS)

    # The guards judge who is asking before any password is checked: a banned
    # client, a refused country or a disabled account is told so, and its
    # password is never tried.
    refusal = await guard_phases.judge(handler.guards, "on_auth", session, login)
    if refusal is not None:
        await refuse(refusal.reply, refusal.reason)
        handler._close_after(server, refusal)
        return

    accounts = getattr(handler, "accounts", None)
    if accounts is not None and accounts.is_disabled(login):
        return await refuse(AUTH_DISABLED, "account disabled")
    verified = await accounts.authenticate(login, password) if accounts is not None else None
    del password
    if verified is None:
        return await refuse(AUTH_TEMPFAIL, "could not check the credentials")
    if not verified:
        return await refuse(AUTH_INVALID, ev.AUTH_INVALID_CREDENTIALS)

    account = accounts.get(login)
    address = account.address if account is not None else account_key(login)
    session.authenticated = True
    session.auth_data = AuthenticatedUser(login=address, mechanism=mechanism)
    session.login_data = address
    record("success", None)
    await server.push(AUTH_OK)

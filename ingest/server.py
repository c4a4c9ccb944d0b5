"""The SMTP server: turns SMTP into events and decides what the dialogue must decide.

It never looks inside a message (that is ``streams/``). At the end of DATA it
makes the message durable in exactly one place, the blob store plus its
``message.received`` event, and only then answers 250. When either is
unavailable it answers 451 and the client keeps the message.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from asyncio import sslproto

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from bulwark import metrics
from bulwark.blobstore import BlobStore, BlobStoreError
from bulwark.headers import parse_headers
from bulwark.kafka import BATCHING_LINGER_MS, DurableLog, EventPublisher, start_publisher
from bulwark.policy import Policy
from bulwark.policy.runtime import PolicyHolder
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from ingest import guards as guard_phases
from ingest.accounts import AccountDirectory
from ingest.auth import MECHANISMS as AUTH_MECHANISMS
from ingest.auth import ehlo_keywords, listener_rules, listener_ports, requiretls_refusal, smtp_auth
from ingest import mta_sts_host
from ingest.tls import server_tls
from ingest.guards import Refusal
from ingest.guards.ip_shielding import IPShieldingGuard
from ingest.guards.limits import SessionClock, SessionLimitsGuard, SessionTimeouts, size_reply
from ingest.guards.lists import ListsGuard
from ingest.enforcement import start_abuse_guards
from ingest.guards.location import LocationGuard
from bulwark.backscatter import Keyring
from ingest.guards.backlog import EventBacklogGuard
from ingest.guards.backscatter import BackscatterGuard
from ingest.verdicts import VerdictWaiter
from ingest.guards.relay import RelayGuard, may_relay, raw_path_refusal, take_sender_note
from ingest.guards.verification import start_verification_guard, stop_verification_guard, take_verification
from schemas import events as ev
from schemas.events import new_id, utcnow

log = logging.getLogger(__name__)

TEMPFAIL_RECORD = "451 4.3.0 Temporary failure recording the message; please try again later"
TEMPFAIL_INTERNAL = "451 4.3.0 Temporary local problem; please try again later"

#: Replies to a command whose argument holds bytes that are not UTF-8. RFC
#: 5321 commands are ASCII and RFC 6531 (SMTPUTF8) allows UTF-8 only, so no
#: such command is valid; the enhanced codes are RFC 3463's for bad syntax.
NOT_UTF8_REPLIES = {
    "MAIL": "501 5.1.7 Bad sender address syntax: bytes that are not UTF-8",
    "RCPT": "501 5.1.3 Bad recipient address syntax: bytes that are not UTF-8",
}
NOT_UTF8_REPLY = "501 5.5.2 Syntax error: bytes that are not UTF-8"
#: As Postfix answers it.
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"
NOT_UTF8_REASON = "bytes that are not UTF-8"

#: Connections the kernel may hold for ingest to accept (asyncio's default:
#: 100; the kernel caps it at net.core.somaxconn). SMTP is server-speaks-first:
#: when a burst overflows the accept queue the kernel drops the client's last
#: handshake ACK, the client believes it is connected and waits for a banner
#: that, once the SYN-ACK retries run out (about 60 s), never comes. Seen
#: with 10,000 connections in 42 s (bench/abuse.py): 206 of them.
LISTEN_BACKLOG = 1024

#: Bytes asyncio reads at a time from a TLS connection, a buffer every TLS
#: connection keeps for its whole life (asyncio's default: 256 KiB). 200
#: STARTTLS sessions cost ingest 50 MB (bench/abuse.py); 64 KiB is four TLS
#: records, and reads of 50 MB messages stay large.
TLS_READ_BUFFER = 64 * 1024


def bound_tls_buffers() -> None:
    """Every TLS connection in this process (STARTTLS and the implicit-TLS
    listener, whose protocol asyncio builds itself) reads TLS_READ_BUFFER at a time."""
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _path_text(arg: str) -> str:
    """The address of a MAIL FROM:<...> or RCPT TO:<...> argument as the client wrote it."""
    path = arg.split(":", 1)[1].strip() if ":" in arg else arg
    if path.startswith("<") and ">" in path:
        return path[1:path.index(">")]
    return path.split(" ", 1)[0]


def _is_utf8(arg: str) -> bool:
    """False when aiosmtpd's surrogateescape decoding met a byte that is not UTF-8."""
    if arg.isascii():
        return True
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class GatewaySession(Session):
    """aiosmtpd's session plus what Bulwark records about it."""

    def __init__(self, loop):
        super().__init__(loop)
        self.id = new_id()
        self.started = time.monotonic()
        self.messages_accepted = 0
        self.client_ip = ""
        #: Set once the session is encrypted (STARTTLS or implicit TLS); what
        #: AUTH and REQUIRETLS trust, as aiosmtpd leaves ``ssl`` None on
        #: implicit TLS.
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        #: What the dialogue guards learn about the connection (allow list,
        #: host name, country) and its command count (session limits).
        self.allow_listed_client: str | None = None
        self.allow_listed_sender: str | None = None
        self.client_host: str | None = None
        self.client_country: str | None = None
        self.commands = 0
        self.recipient_overshoot = 0
        #: The transaction in progress (aiosmtpd keeps it on the server): what
        #: the recipient limit and the commands limit judge.
        self.envelope: Envelope | None = None

    #: Kept across STARTTLS: facts about the connection, not the dialogue.
    CONNECTION_FACTS = ("allow_listed_client", "client_host", "client_country", "commands", "recipient_overshoot")


class SessionClosed(asyncio.CancelledError):
    """The session was closed (a closing refusal, aiosmtpd's own limits, QUIT):
    what the client pipelined after that is not processed.

    aiosmtpd's dialogue loop goes on reading buffered lines until the close
    completes, and answers and closes again for each; on a TLS connection the
    second close breaks asyncio's transport, whose next read or write raised
    AttributeError, reported as an unexpected error (found by
    bench/smtp_fuzz.py). A CancelledError is how aiosmtpd's loop ends a
    session whose connection is gone.
    """


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with connect and disconnect events, asynchronous AUTH and REQUIRETLS,
    and timeouts that follow the policy and the load (ingest.guards.limits.SessionTimeouts)."""

    def __init__(self, handler: "IngestHandler", timeouts: SessionTimeouts | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self.handler = handler
        self._parsing_mail = False
        self._clock: SessionClock | None = None
        self._timeouts = timeouts if timeouts is not None else SessionTimeouts(handler.policy)
        self._counted = False
        # Loop times of the last valid command, and of the last complete line
        # from the client or reply to it: what the timeouts measure.
        self._last_command = self._last_line = 0.0
        # Every recognised command passes the on_command guards first (the
        # commands-per-session limit); aiosmtpd has no hook for that.
        self._smtp_methods = {name: self._guarded(name, method) for name, method in self._smtp_methods.items()}

    def _guarded(self, command: str, method):
        async def run(arg):
            # Let the other sessions run between two commands: pipelined
            # commands are already in the buffer, so nothing else would
            # suspend this one, and 1,000 pipelined RCPTs held every other
            # client (its banner included) for 1.5 s (bench/abuse.py).
            await asyncio.sleep(0)
            if self._closing():
                raise SessionClosed()
            self.session.envelope = self.envelope
            refusal = await self.handler.command_refusal(self.session, command)
            if refusal is not None:
                await self.push(refusal.reply)
                self.transport.close()
                return
            if arg is not None and not _is_utf8(arg):
                await self.push(self.handler.refuse_not_utf8(self.session, command, arg))
                return
            await method(arg)
        return run

    async def push(self, status: str) -> None:
        # aiosmtpd refuses an oversized message itself, without an enhanced
        # status code and before any hook: give the RFC 3463 code and record why.
        rewritten = size_reply(status, self.data_size_limit or 0)
        if rewritten is not None:
            status, phase, reason = rewritten
            self.handler.record_refusal(self.session, phase, Refusal(status, reason))
        if self._closing():
            raise SessionClosed()
        self._last_line = self.loop.time()  # a reply: from now on the client is the one to speak
        metrics.smtp_reply(status)
        await super().push(status)

    def _closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _getaddr(self, arg: str):
        # The email package's address parser raises IndexError, not
        # HeaderParseError, on an unclosed path with an empty domain
        # ("RCPT TO:<a@"), which aiosmtpd answered 451 as an unexpected error
        # (found by bench/smtp_fuzz.py). It is a syntax error like the others.
        try:
            return super()._getaddr(arg)
        except IndexError:
            return None, None

    # -- timeouts ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # A line is progress; a byte is not (a slowloris sends one every few seconds).
        if b"\n" in data:
            self._last_line = self.loop.time()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this at connect and at every valid command, and arms
        # its timer with _timeout_cb; that decides, from SessionTimeouts.
        self._last_command = self._last_line = self.loop.time()
        super()._reset_timeout(duration or self._timeouts.next_check(0))

    def _waiting_for_client(self) -> bool:
        # The session's reader has a read pending (asyncio.StreamReader's
        # waiter): the gateway is not busy with a reply (a verdict, a password).
        return getattr(self._reader, "_waiter", None) is not None

    def _timeout_cb(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        since_command = now - self._last_command
        since_line = now - self._last_line
        refusal = self._timeouts.expired(since_command, since_line, self._waiting_for_client())
        if refusal is None:
            self._timeout_handle = self.loop.call_later(self._timeouts.next_check(since_command, since_line),
                                                        self._timeout_cb)
            return
        log.info("closing the session from %s: %s", self.session.client_ip, refusal.reason)
        transport.write(f"{refusal.reply}\r\n".encode())
        metrics.smtp_reply(refusal.reply)
        self.handler.record_refusal(self.session, "session", refusal)
        # Gone from now on, not from connection_lost on a later loop turn:
        # sessions looked at in this same turn see the stress as it now is.
        self._uncount()
        transport.close()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._timeouts.open -= 1

    async def smtp_RCPT(self, arg: str | None) -> None:
        # Source routes and several @ never reach handle_RCPT intact (aiosmtpd
        # strips the route, or answers a bare syntax error): judge the text.
        refusal = raw_path_refusal(arg) if self.envelope.mail_from is not None else None
        if refusal is not None:
            self.handler.record_rcpt(self.session, (arg or "")[3:].strip(), refusal)
            await self.push(refusal.reply)
            return
        await super().smtp_RCPT(arg)

    def _create_session(self) -> Session:
        return GatewaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        before = self.session
        super().connection_made(transport)
        if starttls and before is not None:
            # aiosmtpd starts a fresh session after STARTTLS, forgetting what
            # the client said (RFC 3207 4.2); it is still the same connection,
            # so it keeps its id and client address.
            self.session.id, self.session.started = before.id, before.started
            self.session.client_ip, self.session.messages_accepted = before.client_ip, before.messages_accepted
            for name in GatewaySession.CONNECTION_FACTS:
                setattr(self.session, name, getattr(before, name))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.session.tls_version = ssl_object.version()
            self.session.tls_cipher = (ssl_object.cipher() or (None,))[0]
        if not starttls:
            if not self._counted:
                self._counted = True
                self._timeouts.open += 1
            self.handler.on_connect(self.session, transport)
        else:
            self.handler.on_starttls(self.session)

    def _discard_pipelined_plaintext(self) -> None:
        """Drop what the client sent after STARTTLS, and let the socket be read again.

        RFC 3207 4.2 says it is discarded, and aiosmtpd does so once the
        handshake is done. But more than two lines of it (2 x 1001 bytes)
        have by then paused reading on the socket (asyncio's flow control),
        and the TLS layer, never resumed, could read neither a ClientHello
        nor the client hanging up: the session was held for the 60-second
        handshake timeout (found by tests/test_fuzz_smtp.py).
        """
        reader = self._reader
        reader._buffer.clear()  # type: ignore[attr-defined]
        reader._maybe_resume_transport()  # type: ignore[attr-defined]

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd 1.4.6's, with a handshake timeout from the policy: its
        # SSLProtocol gets asyncio's default of 60 seconds, which a client that
        # says STARTTLS and then nothing holds the connection for. (Plaintext
        # after STARTTLS fails at once: it is not a TLS record.)
        if self.session.tls_version:
            # RFC 3207: never a second TLS layer over the first. aiosmtpd
            # does not advertise STARTTLS again but accepted it, and asyncio
            # cannot end a handshake nested in TLS when the client leaves (its
            # own TypeError in SSLProtocol._abort): the session was held for
            # the handshake timeout (found by bench/smtp_fuzz.py).
            self.handler.record_refusal(self.session, "STARTTLS", Refusal(TLS_ALREADY_ACTIVE, "TLS already active"))
            await self.push(TLS_ALREADY_ACTIVE)
            return
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        self._discard_pipelined_plaintext()
        await self.push("220 Ready to start TLS")
        timeout = self._timeouts.handshake_seconds()
        waiter = self.loop.create_future()
        # The same bound on the closing handshake (asyncio's default: 30 s), so a
        # client that never answers close_notify does not keep the socket.
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout)
        # Keep the original transport, to close it when the connection is lost.
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # On timeout SSLProtocol fails the handshake with ConnectionAbortedError.
            timed_out = isinstance(error, ConnectionAbortedError)
            self.handler.on_starttls_failed(
                self.session, error, f"no TLS handshake within {timeout:g} seconds" if timed_out else None)
            # aiosmtpd's dialogue loop closes the connection on this exception.
            raise TLSSetupException() from error

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # Already recorded and logged (on_starttls_failed): a client's
            # failed handshake is not the gateway's error, so no traceback.
            return TEMPFAIL_INTERNAL
        return await super().handle_exception(error)

    @syntax("AUTH <mechanism> [initial-response]")
    async def smtp_AUTH(self, arg: str) -> None:
        # Replaces aiosmtpd's, whose authenticator is synchronous (see ingest.auth).
        await smtp_auth(self, arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._parsing_mail = True
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._parsing_mail = False

    def _getparams(self, params):
        # aiosmtpd refuses unknown MAIL parameters with 555 before any hook
        # runs; REQUIRETLS (RFC 8689, no value) is let through to handle_MAIL,
        # which accepts it only over TLS and records it on the envelope.
        result = super()._getparams(params)
        if result is not None and self._parsing_mail and result.get("REQUIRETLS") is True:
            del result["REQUIRETLS"]
        return result

    async def _handle_client(self) -> None:
        # aiosmtpd has no connect hook that can refuse; this runs the connect
        # guards before the banner, as Postfix's smtpd_client_restrictions do.
        refusal = await self.handler.connect_refusal(self.session)
        if refusal is not None:
            await self.push(refusal.reply)
            self.transport.close()
            return
        self._clock = SessionClock(self, self.handler.policy.current, self.handler.record_session_end)
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        if self._clock is not None:
            self._clock.cancel()
        self._uncount()
        super().connection_lost(error)
        if session is not None:
            self.handler.on_disconnect(session)


class IngestHandler:
    """aiosmtpd hooks, named after the SMTP phases."""

    def __init__(self, policy: Policy | PolicyHolder, publisher: EventPublisher, durable: DurableLog, blobs: BlobStore,
                 listener: str = "inbound", guards: list | None = None, accounts=None, verdicts=None):
        # A holder: every read of self.policy (and the guards') is the policy
        # in force at that moment, so `bulwark policy apply` needs no restart.
        self.policy = policy = PolicyHolder.of(policy)
        self.publisher = publisher
        self.durable = durable
        self.blobs = blobs
        self.listener = listener
        #: ingest.accounts.AccountDirectory: AUTH checks credentials against it.
        self.accounts = accounts
        self.guards = guards if guards is not None else default_guards(policy, accounts)
        #: ingest.verdicts.VerdictWaiter for inline refusal; None: never wait.
        self.verdicts = verdicts

    @staticmethod
    def _close_after(server: SMTP, refusal: Refusal | None) -> None:
        if refusal is not None and refusal.close and server.transport is not None:
            # The reply is written first; closing on the next loop turn
            # (once: a TLS transport closed twice breaks).
            transport = server.transport
            asyncio.get_running_loop().call_soon(lambda: transport.is_closing() or transport.close())

    # -- connection ------------------------------------------------------

    def on_connect(self, session: GatewaySession, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        session.client_ip = peer[0]
        metrics.SMTP_SESSIONS.labels(listener=self.listener).inc()
        self.publisher.emit(
            ev.SessionConnected(
                session_id=session.id,
                client_ip=peer[0],
                client_port=peer[1],
                listener=self.listener,
                server_port=sock[1],
            )
        )

    async def connect_refusal(self, session: GatewaySession) -> Refusal | None:
        version = self.policy.version
        refusal = await guard_phases.judge(self.guards, "on_connect", session)
        if refusal is not None:
            self.publisher.emit(
                ev.SessionRefused(
                    session_id=session.id, client_ip=session.client_ip, phase="connect",
                    reply_code=refusal.code, reason=refusal.reason, policy_version=version,
                )
            )
        return refusal

    def on_starttls(self, session: GatewaySession) -> None:
        self.publisher.emit(ev.SessionStartTls(session_id=session.id, client_ip=session.client_ip, outcome="success",
                                               tls_version=session.tls_version, cipher=session.tls_cipher))

    def on_starttls_failed(self, session: GatewaySession, error: BaseException | None,
                           reason: str | None = None) -> None:
        # The handshake's error names what the client offered (no protocol
        # or cipher in common, plaintext), which is what an administrator needs.
        reason = reason or getattr(error, "reason", None) or type(error).__name__
        log.info("STARTTLS from %s failed: %s", session.client_ip, reason)
        self.publisher.emit(ev.SessionStartTls(session_id=session.id, client_ip=session.client_ip, outcome="failure"))

    async def command_refusal(self, session: GatewaySession, command: str) -> Refusal | None:
        refusal = await guard_phases.judge(self.guards, "on_command", session, command)
        if refusal is not None:
            self.record_refusal(session, command, refusal)
        return refusal

    def record_refusal(self, session: GatewaySession, phase: str, refusal: Refusal) -> None:
        """A refusal outside the handle_* hooks (limits, aiosmtpd's own checks)."""
        self.publisher.emit(
            ev.SessionRefused(
                session_id=session.id, client_ip=session.client_ip, phase=phase,
                reply_code=refusal.code, reason=refusal.reason, policy_version=self.policy.version,
            )
        )

    def refuse_not_utf8(self, session: GatewaySession, command: str, arg: str) -> str:
        """The reply to a command carrying bytes that are not UTF-8, recorded as its
        ASCII twin would be: a refused RCPT is a failed RCPT that Dynamic
        Screening counts, whatever its bytes (the event escapes them)."""
        reply = NOT_UTF8_REPLIES.get(command, NOT_UTF8_REPLY)
        refusal = Refusal(reply, NOT_UTF8_REASON)
        path = _path_text(arg)
        if command == "RCPT":
            self.record_rcpt(session, path, refusal)
        elif command == "MAIL":
            self.publisher.emit(ev.SessionMail(
                session_id=session.id, client_ip=session.client_ip, sender=path, accepted=False,
                reply_code=refusal.code, reason=refusal.reason, policy_version=self.policy.version,
            ))
        elif command == "AUTH":
            self.publisher.emit(ev.SessionAuth(
                session_id=session.id, client_ip=session.client_ip, mechanism=(arg.split() or [""])[0][:20],
                outcome="failure", reason=NOT_UTF8_REASON,
            ))
        else:
            self.publisher.emit(ev.SessionRefused(
                session_id=session.id, client_ip=session.client_ip, phase=command, reply_code=refusal.code,
                reason=refusal.reason, argument=arg, policy_version=self.policy.version,
            ))
        return reply

    def record_session_end(self, session: GatewaySession, refusal: Refusal) -> None:
        self.record_refusal(session, "session", refusal)

    def record_rcpt(self, session: GatewaySession, recipient: str, refusal: Refusal) -> None:
        """A RCPT refused before handle_RCPT (a path aiosmtpd would rewrite)."""
        self.publisher.emit(
            ev.SessionRcpt(
                session_id=session.id, client_ip=session.client_ip, recipient=recipient, accepted=False,
                reply_code=refusal.code, reason=refusal.reason, policy_version=self.policy.version,
            )
        )

    def on_disconnect(self, session: GatewaySession) -> None:
        self.publisher.emit(
            ev.SessionDisconnected(
                session_id=session.id,
                client_ip=session.client_ip,
                duration_seconds=round(time.monotonic() - session.started, 3),
                messages_accepted=session.messages_accepted,
            )
        )

    # -- greeting ----------------------------------------------------------

    async def handle_EHLO(self, server, session: GatewaySession, envelope, hostname: str, responses: list[str]):
        session.host_name = hostname
        self.publisher.emit(ev.SessionEhlo(session_id=session.id, client_ip=session.client_ip, hostname=hostname, esmtp=True))
        return ehlo_keywords(self, session, responses)

    async def handle_HELO(self, server, session: GatewaySession, envelope, hostname: str):
        session.host_name = hostname
        self.publisher.emit(ev.SessionEhlo(session_id=session.id, client_ip=session.client_ip, hostname=hostname, esmtp=False))
        return f"250 {server.hostname}"

    # -- envelope ------------------------------------------------------------

    async def handle_MAIL(self, server, session: GatewaySession, envelope: Envelope, address: str, options: list[str]):
        # aiosmtpd hands over the null reverse-path as "<>"; Bulwark's events
        # use the empty string, so "no sender" can never be mistaken for one.
        address = "" if address == "<>" else address
        version = self.policy.version
        refusal = requiretls_refusal(self.policy, session, options) or await guard_phases.judge(
            self.guards, "on_mail", session, address, options)
        # An accepted unknown local sender: what vouched for it (relay control).
        note = take_sender_note(session)
        self.publisher.emit(
            ev.SessionMail(
                session_id=session.id,
                client_ip=session.client_ip,
                sender=address,
                parameters=dict(_parse_param(o) for o in options),
                accepted=refusal is None,
                reply_code=refusal.code if refusal else 250,
                reason=refusal.reason if refusal else note,
                policy_version=version,
            )
        )
        if refusal:
            self._close_after(server, refusal)
            return refusal.reply
        # aiosmtpd takes an empty mail_from for "no MAIL yet" (503 at RCPT),
        # so its envelope keeps the null sender as "<>".
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session: GatewaySession, envelope: Envelope, address: str, options: list[str]):
        version = self.policy.version
        session.envelope = envelope  # the transaction so far, for the recipients-per-message limit
        # A guard may rewrite the recipient first (Backscatter Protection
        # untags a signed return path), so every guard judges the real address.
        for guard in self.guards:
            rewrite = getattr(guard, "rewrite_rcpt", None)
            if rewrite is not None:
                address = rewrite(session, address)
        refusal = await guard_phases.judge(self.guards, "on_rcpt", session, address, options)
        self.publisher.emit(
            ev.SessionRcpt(
                session_id=session.id,
                client_ip=session.client_ip,
                recipient=address,
                accepted=refusal is None,
                reply_code=refusal.code if refusal else 250,
                reason=refusal.reason if refusal else None,
                policy_version=version,
                verification=take_verification(session, address),
            )
        )
        if refusal:
            self._close_after(server, refusal)
            return refusal.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server, session: GatewaySession, envelope):
        self.publisher.emit(ev.SessionRset(session_id=session.id, client_ip=session.client_ip))
        return "250 2.0.0 Ok"

    # -- content -------------------------------------------------------------

    def _direction(self, session: GatewaySession, rcpts: list[str]) -> str:
        if not may_relay(self.policy, session):
            return "inbound"
        local = [self.policy.is_local_domain(r.rpartition("@")[2]) for r in rcpts]
        return "internal" if all(local) else "outbound"

    async def handle_DATA(self, server, session: GatewaySession, envelope: Envelope):
        raw: bytes = envelope.original_content or b""
        message_id = new_id()
        version = self.policy.version

        def data_event(accepted: bool, reply: str, reason: str | None = None) -> None:
            metrics.message_after_data(reply)
            self.publisher.emit(
                ev.SessionData(
                    session_id=session.id,
                    message_id=message_id,
                    client_ip=session.client_ip,
                    accepted=accepted,
                    reply_code=int(reply[:3]),
                    size=len(raw),
                    reason=reason,
                    policy_version=version,
                )
            )

        refusal = await guard_phases.judge(self.guards, "on_data", session, raw)
        if refusal is not None:
            data_event(False, refusal.reply, refusal.reason)
            self._close_after(server, refusal)
            return refusal.reply

        try:
            digest = await self.blobs.put(raw)
        except BlobStoreError as exc:
            log.error("message %s not accepted: %s", message_id, exc)
            data_event(False, TEMPFAIL_RECORD, "blob store unavailable")
            return TEMPFAIL_RECORD

        headers = parse_headers(raw)
        received = ev.MessageReceived(
            session_id=session.id,
            message_id=message_id,
            envelope=ev.Envelope(
                mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
                rcpt_to=list(envelope.rcpt_tos),
                sha256=digest,
                size=len(raw),
                client_ip=session.client_ip,
                client_helo=session.host_name,
                authenticated_user=_login_name(session),
                tls=session.tls_version,
                received_at=utcnow(),
                requiretls="REQUIRETLS" in envelope.mail_options,
            ),
            direction=self._direction(session, list(envelope.rcpt_tos)),
            header_message_id=(headers.get("Message-ID") or None),
        )
        inline = self.policy.current.inline_refusal
        pending = self.verdicts.expect(message_id) if self.verdicts and inline.enabled else None
        try:
            await self.durable.record(received)
        except Exception as exc:
            # The broker did not take it: the client keeps the message and
            # retries. The blob we wrote is harmless (content-addressed, and
            # the retry will find it already there).
            if pending is not None:
                self.verdicts.forget(message_id)
            log.error("message %s not accepted: Kafka did not acknowledge: %s", message_id, type(exc).__name__)
            data_event(False, TEMPFAIL_RECORD, "event log unavailable")
            return TEMPFAIL_RECORD

        if pending is not None:
            verdict = await self.verdicts.wait(message_id, pending, inline.deadline_seconds)
            if verdict is not None and verdict.action == "reject":
                reply = f"550 5.7.1 Message refused by content policy ({', '.join(verdict.reasons)})"
                try:
                    await self.durable.record(ev.MessageRefused(
                        session_id=session.id, message_id=message_id, reply_code=550,
                        reasons=verdict.reasons, policy_version=verdict.policy_version,
                    ))
                except Exception:
                    # Cannot record the refusal: accept instead; the reject
                    # verdict has the quarantine sink hold the message.
                    log.error("message %s: refusal not recorded; accepting (it will be quarantined)", message_id)
                else:
                    data_event(False, reply, "refused by verdict")
                    return reply

        session.messages_accepted += 1
        reply = f"250 2.0.0 Ok: queued as {message_id}"
        data_event(True, reply)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        # Never crash, never leak internals to the client: a 451 keeps the
        # message on the client's side.
        log.exception("unexpected error in the SMTP dialogue")
        return TEMPFAIL_INTERNAL


def default_guards(policy: Policy | PolicyHolder, accounts=None) -> list:
    """The guards, in the order they judge; each reads the policy in force when
    it judges, and one whose feature the policy turns off lets everything by.

    The lists come first: an allow-listed client is known before the guards
    that it may skip. IP Shielding precedes relay control, so a forged local
    sender is told which rule refused it rather than only "authenticate".
    """
    return [
        ListsGuard(policy),
        LocationGuard(policy),
        SessionLimitsGuard(policy),
        IPShieldingGuard(policy),
        RelayGuard(policy, accounts),
    ]


def _parse_param(option: str) -> tuple[str, str]:
    key, _, value = option.partition("=")
    return key.upper(), value


def _login_name(session: Session) -> str | None:
    if not session.authenticated:
        return None
    data = session.auth_data
    login = getattr(data, "login", None)
    return login.decode() if isinstance(login, bytes) else login


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it.

    Every SMTP session is a socket: at a service manager's usual soft limit
    (1024) an idle-connection flood would leave no descriptor for the blob
    store or Kafka. The hard limit is what the administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def transactional_id(settings: Settings) -> str:
    """This ingest process's transactional id: the same after a restart, so
    the broker fences its previous incarnation and aborts what it left open;
    distinct from every other ingest process's."""
    base = f"bulwark-ingest-{socket.gethostname()}-{settings.smtp_port}"
    return base if settings.instance == 0 else f"{base}-{settings.instance + 1}"


async def serve(settings: Settings) -> None:
    configure_logging("ingest")
    # aiosmtpd logs every command line, and its AUTH mechanisms, at INFO:
    # about twelve lines a message, the dialogue the smtp.sessions events
    # already record (with the decisions, which its log lacks), and 3 % of
    # ingest's CPU in a py-spy profile under bench/e2e_relay.py. Its
    # warnings and errors still come through.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    log.info("open files limit: %d", raise_open_files_limit())
    bound_tls_buffers()
    policy = PolicyHolder(settings=settings)
    await policy.start()
    publisher = await start_publisher(settings, "bulwark-ingest", linger_ms=BATCHING_LINGER_MS)
    durable = DurableLog(settings, transactional_id(settings))
    await durable.start()
    accounts = AccountDirectory(settings, policy)
    await accounts.start()
    tls = server_tls(settings, policy)
    blobs = BlobStore(settings.blob_dir)
    verdicts = VerdictWaiter(settings)
    await verdicts.start()
    handler = IngestHandler(policy, publisher, durable, blobs, accounts=accounts, verdicts=verdicts)
    # User verification judges unknown recipients just before relay control
    # (which it tells about automatically created domains).
    verification = await start_verification_guard(settings, policy, accounts, publisher)
    relay_at = next((i for i, g in enumerate(handler.guards) if isinstance(g, RelayGuard)), len(handler.guards))
    handler.guards.insert(relay_at, verification)
    # Relay control asks the same sources about unknown local senders at
    # MAIL: one cache and one set of connections for MAIL and RCPT.
    for guard in handler.guards:
        if isinstance(guard, RelayGuard):
            guard.verifier = verification.verifier
    # Dynamic Screening and Account Hijack Detection enforce what the streams
    # decided; right after the lists, so an allow-listed client is known.
    lists_end = next((i + 1 for i, g in enumerate(handler.guards) if isinstance(g, ListsGuard)), 0)
    handler.guards[lists_end:lists_end] = await start_abuse_guards(settings, policy, accounts)
    # Backscatter Protection judges returned mail once relay control has let
    # it in (it is addressed to a local domain).
    keyring = Keyring(settings)
    await keyring.start()
    handler.guards.append(BackscatterGuard(lambda: policy.current, keyring, publisher))
    # First of all: nothing new while the event log cannot keep up.
    handler.guards.insert(0, EventBacklogGuard(publisher))

    # Shared by every listener: stress is how many sessions are open in all.
    timeouts = SessionTimeouts(policy, share=1 / settings.ingest_processes)
    # Read when scraped (on the metrics thread): two integers.
    metrics.SMTP_SESSIONS_OPEN.set_function(lambda: timeouts.open)
    metrics.EVENT_BACKLOG.set_function(lambda: publisher.backlog)
    metrics_server = metrics.start("ingest", settings)

    def smtp_factory(handler: IngestHandler, implicit_tls: bool):
        def make() -> GatewaySMTP:
            # Read per connection: a new policy's name, SIZE and listener
            # rules, and a renewed certificate, apply to the next session
            # without a restart.
            context = tls.refresh()
            return GatewaySMTP(
                handler,
                timeouts,
                hostname=policy.current.hostname,
                ident="Bulwark ESMTP",
                data_size_limit=policy.current.max_message_bytes,
                enable_SMTPUTF8=True,
                decode_data=False,
                # STARTTLS on every port but the one already encrypted.
                tls_context=None if implicit_tls else context,
                auth_required=listener_rules(handler).require_auth,
                # AUTH is GatewaySMTP.smtp_AUTH's alone; aiosmtpd's synchronous
                # built-ins are switched off so nothing can fall back to them.
                auth_exclude_mechanism=AUTH_MECHANISMS,
            )
        return make

    servers = []
    handshake = policy.current.session_limits.tls_handshake_timeout_seconds
    for name, port in listener_ports(settings):
        # One set of guards for all listeners: they hold shared state (bans...).
        listener = handler if name == "inbound" else IngestHandler(
            policy, publisher, durable, blobs, listener=name, guards=handler.guards, accounts=accounts,
            verdicts=verdicts)
        implicit_tls = name == "submissions"
        servers.append(await asyncio.get_running_loop().create_server(
            smtp_factory(listener, implicit_tls), host=settings.smtp_host, port=port, backlog=LISTEN_BACKLOG,
            # Several ingest processes share the ports; the kernel spreads
            # the connections between them (bulwark up starts one per core).
            reuse_port=settings.ingest_processes > 1,
            ssl=tls.context if implicit_tls else None,
            # The listening socket's own handshakes (implicit TLS): read once,
            # at start; STARTTLS reads the policy in force at each handshake.
            ssl_handshake_timeout=handshake if implicit_tls else None,
            ssl_shutdown_timeout=handshake if implicit_tls else None,
        ))
        log.info("listening for SMTP (%s) on %s:%d (policy %s)", name, settings.smtp_host, port, policy.version)
    mta_sts = None
    if settings.mta_sts_port:
        mta_sts = await mta_sts_host.start(lambda: policy.current, settings.smtp_host, settings.mta_sts_port,
                                           tls.context, reuse_port=settings.ingest_processes > 1)
    try:
        await run_until_signalled(*(server.serve_forever() for server in servers))
    finally:
        for server in servers:
            server.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        if mta_sts is not None:
            await mta_sts.cleanup()
        await stop_verification_guard(verification)
        await verdicts.stop()
        await keyring.stop()
        await accounts.stop()
        await durable.stop()
        await publisher.stop()

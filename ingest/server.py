"""The SMTP server: turns SMTP into events and decides what the dialogue must decide.

It never looks inside a message (that is ``streams/``). At the end of DATA it
makes the message durable in exactly one place, the blob store plus its
``message.received`` event, and only then answers 250. When either is
unavailable it answers 451 and the client keeps the message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from email.parser import BytesHeaderParser

from aiosmtpd.smtp import SMTP, Envelope, Session

from bulwark.blobstore import BlobStore, BlobStoreError
from bulwark.kafka import DurableLog, EventPublisher, start_publisher
from bulwark.policy import Policy, load
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from ingest import guards as guard_phases
from ingest.guards import Refusal
from ingest.guards.relay import RelayGuard, may_relay
from schemas import events as ev
from schemas.events import new_id, utcnow

log = logging.getLogger(__name__)

TEMPFAIL_RECORD = "451 4.3.0 Temporary failure recording the message; please try again later"
TEMPFAIL_INTERNAL = "451 4.3.0 Temporary local problem; please try again later"


class GatewaySession(Session):
    """aiosmtpd's session plus what Bulwark records about it."""

    def __init__(self, loop):
        super().__init__(loop)
        self.id = new_id()
        self.started = time.monotonic()
        self.messages_accepted = 0
        self.client_ip = ""


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with connect and disconnect events."""

    def __init__(self, handler: "IngestHandler", **kwargs):
        super().__init__(handler, **kwargs)
        self.handler = handler

    def _create_session(self) -> Session:
        return GatewaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        super().connection_made(transport)
        if not starttls:
            self.handler.on_connect(self.session, transport)

    async def _handle_client(self) -> None:
        # aiosmtpd has no connect hook that can refuse; this runs the connect
        # guards before the banner, as Postfix's smtpd_client_restrictions do.
        refusal = await self.handler.connect_refusal(self.session)
        if refusal is not None:
            await self.push(refusal.reply)
            self.transport.close()
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        if session is not None:
            self.handler.on_disconnect(session)


class IngestHandler:
    """aiosmtpd hooks, named after the SMTP phases."""

    def __init__(self, policy: Policy, publisher: EventPublisher, durable: DurableLog, blobs: BlobStore,
                 listener: str = "inbound", guards: list | None = None):
        self.policy = policy
        self.publisher = publisher
        self.durable = durable
        self.blobs = blobs
        self.listener = listener
        self.guards = guards if guards is not None else default_guards(policy)
        self._header_parser = BytesHeaderParser()

    @staticmethod
    def _close_after(server: SMTP, refusal: Refusal | None) -> None:
        if refusal is not None and refusal.close and server.transport is not None:
            # The reply is written first; closing on the next loop turn.
            asyncio.get_running_loop().call_soon(server.transport.close)

    # -- connection ------------------------------------------------------

    def on_connect(self, session: GatewaySession, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        session.client_ip = peer[0]
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
        refusal = await guard_phases.judge(self.guards, "on_connect", session)
        if refusal is not None:
            self.publisher.emit(
                ev.SessionRefused(
                    session_id=session.id, client_ip=session.client_ip, phase="connect",
                    reply_code=refusal.code, reason=refusal.reason,
                )
            )
        return refusal

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
        return responses

    async def handle_HELO(self, server, session: GatewaySession, envelope, hostname: str):
        session.host_name = hostname
        self.publisher.emit(ev.SessionEhlo(session_id=session.id, client_ip=session.client_ip, hostname=hostname, esmtp=False))
        return f"250 {server.hostname}"

    # -- envelope ------------------------------------------------------------

    async def handle_MAIL(self, server, session: GatewaySession, envelope: Envelope, address: str, options: list[str]):
        # aiosmtpd hands over the null reverse-path as "<>"; Bulwark's events
        # use the empty string, so "no sender" can never be mistaken for one.
        address = "" if address == "<>" else address
        refusal = await guard_phases.judge(self.guards, "on_mail", session, address, options)
        self.publisher.emit(
            ev.SessionMail(
                session_id=session.id,
                client_ip=session.client_ip,
                sender=address,
                parameters=dict(_parse_param(o) for o in options),
                accepted=refusal is None,
                reply_code=refusal.code if refusal else 250,
                reason=refusal.reason if refusal else None,
            )
        )
        if refusal:
            self._close_after(server, refusal)
            return refusal.reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session: GatewaySession, envelope: Envelope, address: str, options: list[str]):
        refusal = await guard_phases.judge(self.guards, "on_rcpt", session, address, options)
        self.publisher.emit(
            ev.SessionRcpt(
                session_id=session.id,
                client_ip=session.client_ip,
                recipient=address,
                accepted=refusal is None,
                reply_code=refusal.code if refusal else 250,
                reason=refusal.reason if refusal else None,
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

        def data_event(accepted: bool, reply: str, reason: str | None = None) -> None:
            self.publisher.emit(
                ev.SessionData(
                    session_id=session.id,
                    message_id=message_id,
                    client_ip=session.client_ip,
                    accepted=accepted,
                    reply_code=int(reply[:3]),
                    size=len(raw),
                    reason=reason,
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

        headers = self._header_parser.parsebytes(raw)
        ssl = session.ssl or {}
        received = ev.MessageReceived(
            session_id=session.id,
            message_id=message_id,
            envelope=ev.Envelope(
                mail_from=envelope.mail_from or "",
                rcpt_to=list(envelope.rcpt_tos),
                sha256=digest,
                size=len(raw),
                client_ip=session.client_ip,
                client_helo=session.host_name,
                authenticated_user=_login_name(session),
                tls=ssl.get("ssl_object").version() if ssl.get("ssl_object") else None,
                received_at=utcnow(),
                requiretls=False,
            ),
            direction=self._direction(session, list(envelope.rcpt_tos)),
            header_message_id=(headers.get("Message-ID") or None),
        )
        try:
            await self.durable.record(received)
        except Exception as exc:
            # The broker did not take it: the client keeps the message and
            # retries. The blob we wrote is harmless (content-addressed, and
            # the retry will find it already there).
            log.error("message %s not accepted: Kafka did not acknowledge: %s", message_id, type(exc).__name__)
            data_event(False, TEMPFAIL_RECORD, "event log unavailable")
            return TEMPFAIL_RECORD

        session.messages_accepted += 1
        reply = f"250 2.0.0 Ok: queued as {message_id}"
        data_event(True, reply)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        # Never crash, never leak internals to the client: a 451 keeps the
        # message on the client's side.
        log.exception("unexpected error in the SMTP dialogue")
        return TEMPFAIL_INTERNAL


def default_guards(policy: Policy) -> list:
    """The guards the policy enables, in the order they judge."""
    return [RelayGuard(policy)]


def _parse_param(option: str) -> tuple[str, str]:
    key, _, value = option.partition("=")
    return key.upper(), value


def _login_name(session: Session) -> str | None:
    if not session.authenticated:
        return None
    data = session.auth_data
    login = getattr(data, "login", None)
    return login.decode() if isinstance(login, bytes) else login


async def serve(settings: Settings) -> None:
    configure_logging("ingest")
    policy = load(settings.policy_path)
    publisher = await start_publisher(settings, "bulwark-ingest")
    durable = DurableLog(settings, f"bulwark-ingest-{socket.gethostname()}-{settings.smtp_port}")
    await durable.start()
    handler = IngestHandler(policy, publisher, durable, BlobStore(settings.blob_dir))
    server = await asyncio.get_running_loop().create_server(
        lambda: GatewaySMTP(
            handler,
            hostname=policy.hostname,
            ident="Bulwark ESMTP",
            data_size_limit=policy.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
        ),
        host=settings.smtp_host,
        port=settings.smtp_port,
    )
    log.info("listening for SMTP on %s:%d (policy %s)", settings.smtp_host, settings.smtp_port, policy.version)
    try:
        await run_until_signalled(server.serve_forever())
    finally:
        server.close()
        await durable.stop()
        await publisher.stop()

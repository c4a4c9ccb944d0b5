"""SMTP call-forward: ask the domain's mail server whether it accepts a recipient.

EHLO, STARTTLS when offered, MAIL FROM the null sender (configurable), RCPT TO
the address, and RSET; never DATA. A connection is kept open and reused for
the next question (RSET between them), and at most ``max_connections`` are
open to one server, so a burst of RCPTs queues on a few connections instead
of opening hundreds. An idle connection is closed with QUIT.

250/251 means the address exists; a 5xx to RCPT means it does not. A 4xx, a
refused MAIL FROM or a broken connection is "could not tell" (unavailable):
the gateway answers 4xx and the client retries later.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import aiosmtplib

from bulwark.policy.verification import SmtpSource

from .base import Finding, SourceUnavailable, invalid, valid


class CallForwardClient:
    def __init__(self, source: SmtpSource, helo: str):
        self.source = source
        self.helo = source.helo or helo
        self._slots = asyncio.Semaphore(source.max_connections)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._reaper: asyncio.Task | None = None
        #: Connections opened so far (for `bulwark sources test` and tests).
        self.connections_opened = 0

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.source.ca_file) if self.source.ca_file else None)
        if not self.source.tls_verify:
            # Opportunistic STARTTLS (RFC 7435): encrypt, but a self-signed
            # internal server is still asked.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.source.host,
            port=self.source.port,
            timeout=self.source.timeout_seconds,
            local_hostname=self.helo,
            start_tls=None if self.source.starttls else False,  # None: when offered
            tls_context=self._tls_context(),
            validate_certs=self.source.tls_verify,
        )
        await client.connect()
        self.connections_opened += 1
        return client

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        while self._idle:
            client, _ = self._idle.pop()
            if client.is_connected:
                return client, True
        return await self._connect(), False

    def _checkin(self, client: aiosmtplib.SMTP) -> None:
        self._idle.append((client, time.monotonic()))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        while self._idle:
            await asyncio.sleep(self.source.idle_seconds / 2)
            now = time.monotonic()
            stale = [c for c, since in self._idle if now - since >= self.source.idle_seconds]
            self._idle = [(c, since) for c, since in self._idle if c not in stale]
            for client in stale:
                await _quit(client)

    async def _ask(self, client: aiosmtplib.SMTP, address: str) -> Finding:
        try:
            await client.mail(self.source.mail_from)
        except aiosmtplib.SMTPSenderRefused as exc:
            # Some servers refuse the null sender: that says nothing about
            # the recipient.
            await client.rset()
            raise SourceUnavailable(f"call-forward: MAIL FROM refused: {exc.code} {exc.message}") from None
        try:
            rcpt = await client.rcpt(address)
            code, text = rcpt.code, rcpt.message
        except aiosmtplib.SMTPRecipientRefused as exc:
            code, text = exc.code, exc.message
        await client.rset()
        reply = f"{code} {text}".strip()
        if code in (250, 251):
            return valid(f"call-forward: {reply}")
        if 500 <= code < 600:
            return invalid(f"call-forward: {reply}")
        raise SourceUnavailable(f"call-forward: {reply}")

    async def verify(self, address: str) -> Finding:
        deadline = self.source.timeout_seconds
        try:
            async with asyncio.timeout(deadline * 2):  # waiting for a slot counts too
                async with self._slots:
                    for attempt in range(2):
                        client, reused = await self._checkout()
                        try:
                            finding = await self._ask(client, address)
                        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                            await _quit(client)
                            if reused and attempt == 0:
                                continue  # the server closed an idle connection: one fresh try
                            raise SourceUnavailable(f"call-forward: {type(exc).__name__}") from None
                        except SourceUnavailable:
                            self._checkin(client)
                            raise
                        except Exception:
                            await _quit(client)
                            raise
                        self._checkin(client)
                        return finding
        except SourceUnavailable:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            raise SourceUnavailable(f"call-forward to {self.source.host}:{self.source.port}: timed out") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SourceUnavailable(
                f"call-forward to {self.source.host}:{self.source.port}: {type(exc).__name__}"
            ) from None
        raise SourceUnavailable("call-forward: no answer")

    async def authenticate(self, address: str, password: str) -> bool | None:
        return False  # a call-forward can say who exists, not check a password

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await _quit(client)
        if self._reaper:
            self._reaper.cancel()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), 5)
    except Exception:
        client.close()

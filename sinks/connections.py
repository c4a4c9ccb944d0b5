"""Idle SMTP connections kept for the next message to the same server.

Postfix's smtp(8) connection cache in small: after a transaction in which
every recipient was accepted, the connection is kept for a couple of
seconds instead of sent QUIT, and the next message for the same server,
under the same TLS requirement, goes over it. That saves the TCP and TLS
handshakes, the banner, EHLO and STARTTLS (four to six round trips) per
message when mail flows to one destination, as it does to the domain mail
servers.

A connection is only ever reused under the TLS requirement it was opened
(and, for a server Bulwark logs in to, authenticated) with. Before reuse it
is checked with NOOP, so a connection the server closed while idle costs a
new one, never a message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable

import aiosmtplib

from schemas import events as ev

log = logging.getLogger(__name__)

#: Postfix's smtp_connection_cache_time_limit is 2 s.
IDLE_SECONDS = 2.0
#: Postfix's smtp_connection_reuse_time_limit is 300 s: a connection is not
#: kept for ever, whatever the traffic.
REUSE_SECONDS = 300.0


class ConnectionCache:
    def __init__(self, idle_seconds: float = IDLE_SECONDS, reuse_seconds: float = REUSE_SECONDS):
        self.idle_seconds = idle_seconds
        self.reuse_seconds = reuse_seconds
        #: key -> [(client, tls outcome, opened at, idle until)], newest last
        self._idle: dict[Hashable, list[tuple[aiosmtplib.SMTP, ev.TlsOutcome, float, float]]] = {}
        self.reused = 0

    async def take(self, key: Hashable) -> tuple[aiosmtplib.SMTP, ev.TlsOutcome, float] | None:
        """A live idle connection for ``key`` (client, its TLS outcome, when it was opened), or None."""
        entries = self._idle.get(key)
        while entries:
            client, tls, opened, until = entries.pop()
            if until < time.monotonic() or not client.is_connected:
                _close(client)
                continue
            try:
                await client.noop()
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                _close(client)
                continue
            self.reused += 1
            return client, tls, opened
        return None

    def give(self, key: Hashable, client: aiosmtplib.SMTP, tls: ev.TlsOutcome, opened: float) -> bool:
        """Keep ``client`` for the next message; False if it is too old to keep (the caller QUITs)."""
        now = time.monotonic()
        if now - opened > self.reuse_seconds or not client.is_connected:
            return False
        self._idle.setdefault(key, []).append((client, tls, opened, now + self.idle_seconds))
        return True

    async def sweep(self) -> None:
        """QUIT the connections idle past their time (called by the scheduler)."""
        now = time.monotonic()
        expired = []
        for key, entries in list(self._idle.items()):
            keep = [e for e in entries if e[3] >= now]
            expired += [e[0] for e in entries if e[3] < now]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        await asyncio.gather(*(_quit(c) for c in expired))

    async def close(self) -> None:
        clients = [e[0] for entries in self._idle.values() for e in entries]
        self._idle.clear()
        await asyncio.gather(*(_quit(c) for c in clients))


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 5)
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        _close(client)


def _close(client: aiosmtplib.SMTP) -> None:
    try:
        client.close()
    except Exception:  # already gone
        pass

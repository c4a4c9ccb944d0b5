"""Minger: MDaemon's UDP address-verification protocol (draft-hathcock-minger-06).

One query datagram, one answer datagram, on UDP port 4069 (IANA-assigned,
draft section 2). The query names the address and carries either the word
ANONYMOUS or a keyed hash proving the client knows the shared secret
(section 3, security considerations in section 6); the answer repeats the
query's id and gives a status (section 4):

    query    = "MNGR" SP version SP query-id SP credentials SP address
    answer   = "MNGR" SP version SP query-id SP status [SP text]
    credentials = "ANONYMOUS" / hex( HMAC-MD5(shared-secret, query-id SP address) )

    status   1 access denied (anonymous queries refused, or a wrong hash)
             2 malformed query
             3 no such address
             4 the address exists but does not accept mail
             5 the address exists and accepts mail

The draft's text is not reachable from the build machines; this follows the
structure and status codes as we read them (port, anonymous or shared-secret
queries, MD5-keyed hash, statuses 3/4/5 and the access-denied and malformed
errors). The query id is random for every query and the socket is new for
every query (a random source port), so a forged answer has to guess both;
an answer whose id does not match is ignored.

UDP loses datagrams: a query unanswered within the timeout is sent again,
``retries`` times, before the source counts as unavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

from bulwark.policy_verification import MingerSource

from .base import Finding, SourceUnavailable, invalid, valid

VERSION = "1.0"

ACCESS_DENIED, MALFORMED, NO_SUCH_ADDRESS, NOT_ACCEPTING, ACCEPTING = 1, 2, 3, 4, 5


def credentials(secret: str | None, query_id: str, address: str) -> str:
    if secret is None:
        return "ANONYMOUS"
    return hmac.new(secret.encode(), f"{query_id} {address}".encode(), hashlib.md5).hexdigest()


def encode_query(query_id: str, address: str, secret: str | None) -> bytes:
    return f"MNGR {VERSION} {query_id} {credentials(secret, query_id, address)} {address}".encode()


def decode_answer(datagram: bytes) -> tuple[str, int, str]:
    """(query id, status, text); ValueError when it is not a Minger answer."""
    parts = datagram.decode("ascii", "replace").strip().split(" ", 4)
    if len(parts) < 4 or parts[0] != "MNGR" or not parts[3].isdigit():
        raise ValueError("not a Minger answer")
    return parts[2], int(parts[3]), parts[4] if len(parts) > 4 else ""


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, query_id: str):
        self.query_id = query_id
        self.answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query_id, status, text = decode_answer(data)
        except ValueError:
            return
        if query_id == self.query_id and not self.answer.done():
            self.answer.set_result((status, text))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nobody listens. Counted as a lost try.
        if not self.answer.done():
            self.answer.set_exception(ConnectionRefusedError("port unreachable"))


class MingerClient:
    def __init__(self, source: MingerSource):
        self.source = source

    async def _ask_once(self, address: str, secret: str | None) -> tuple[int, str]:
        query_id = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        transport, exchange = await loop.create_datagram_endpoint(
            lambda: _Exchange(query_id), remote_addr=(self.source.host, self.source.port)
        )
        try:
            transport.sendto(encode_query(query_id, address, secret))
            return await asyncio.wait_for(exchange.answer, self.source.timeout_seconds)
        finally:
            transport.close()

    async def verify(self, address: str) -> Finding:
        try:
            secret = self.source.shared_secret()
        except LookupError as exc:
            raise SourceUnavailable(str(exc)) from None
        lost = "no answer"
        for _ in range(1 + self.source.retries):
            try:
                status, text = await self._ask_once(address, secret)
            except (TimeoutError, asyncio.TimeoutError):
                lost = f"no answer within {self.source.timeout_seconds:g}s"
                continue
            except OSError:
                lost = "port unreachable"
                await asyncio.sleep(min(0.2, self.source.timeout_seconds))
                continue
            if status == ACCEPTING:
                return valid("minger: exists and accepts mail")
            if status == NO_SUCH_ADDRESS:
                return invalid("minger: no such address")
            if status == NOT_ACCEPTING:
                return invalid("minger: exists but does not accept mail")
            if status == ACCESS_DENIED:
                raise SourceUnavailable("minger: access denied (anonymous queries refused or wrong shared secret)")
            raise SourceUnavailable(f"minger: status {status} {text}".strip())
        raise SourceUnavailable(f"minger {self.source.host}:{self.source.port}: {lost} after "
                                f"{1 + self.source.retries} tries")

    async def authenticate(self, address: str, password: str) -> bool | None:
        return False  # Minger only verifies addresses

    async def close(self) -> None:
        pass

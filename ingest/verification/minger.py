"""Minger: MDaemon's UDP address-verification protocol (draft-hathcock-minger-06).

What the draft (-06, August 2009) says, by section:

  2    Minger is a UDP protocol on port 4069 (IANA assignment: section 6).
  2.1  The query is one string:

           query-string = mailbox [SP %x64 "=" digest] [SP tag-list]
           digest-text  = shared-secret ":" mailbox
           shared-secret = 1*50(VCHAR)

       so "kim@example.com" (anonymous) or "kim@example.com d=<digest>".
       There is no protocol name, version or query id on the wire.
  2.2  digest = base64( MD5(digest-text) ): the plain MD5 of the secret,
       a colon and the mailbox, base64 encoded (with its "=" padding).
       It is not an HMAC and it is not hex. The tag-list is reserved for
       future use; tag names are case-sensitive, never "d", never repeated.
       This client sends no tags.
  3    The answer is ``response-string = mailbox status``, status one digit
       %x30-35. The ABNF has no SP between the two, but every example in
       section 3.2 has one ("arvel@example.com 3"); both are accepted.
  3.1  status 0 invalid request (e.g. a malformed query string)
              1 access denied (e.g. a query from an unauthorized IP)
              2 bad or missing credentials (anonymous refused, or a wrong digest)
              3 the address does not exist
              4 the address exists but cannot receive mail
              5 the address exists and is active
  4    Clients MAY query anonymously (no digest); a server that refuses
       anonymous queries MUST answer 2.
  5    A shared secret should be at least 128 bits (the policy asks for 16+
       characters; section 2.1 caps it at 50 printable characters).

The draft says nothing about timeouts or retransmission: those are
Bulwark's. A query unanswered within ``timeout_seconds`` is sent again,
``retries`` times, before the source counts as unavailable.

Matching an answer to its query: the draft has no query id, so the answer
is recognised by the mailbox it names (section 3.1: it is the address
verification was asked for). Each query goes out from a new connected
socket (a random source port, and the kernel drops datagrams from any other
address than the server's), so a forged answer has to guess the port too.
The digest covers only the secret and the mailbox (section 2.2), so a
captured query can be replayed for that same mailbox; the secret itself
never leaves this host.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

from bulwark.policy.verification import MingerSource

from .base import Finding, SourceUnavailable, invalid, valid

#: Not on the wire: draft -06 carries no version (section 2.1). Kept for callers.
VERSION = "draft-hathcock-minger-06"

#: Status codes, section 3.1.
INVALID_REQUEST, ACCESS_DENIED, BAD_CREDENTIALS, NO_SUCH_ADDRESS, NOT_ACCEPTING, ACCEPTING = 0, 1, 2, 3, 4, 5
MALFORMED = INVALID_REQUEST  # the old name of status 0

STATUS_TEXT = {
    INVALID_REQUEST: "invalid request",
    ACCESS_DENIED: "access denied",
    BAD_CREDENTIALS: "bad or missing credentials",
    NO_SUCH_ADDRESS: "email address does not exist",
    NOT_ACCEPTING: "email address exists but can not receive mail",
    ACCEPTING: "email address exists and is active",
}


def _is_vchars(text: str) -> bool:
    return bool(text) and all("\x21" <= c <= "\x7e" for c in text)


def expressible(address: str) -> bool:
    """Whether the address fits section 2.1's ``mailbox`` in a query.

    The query's fields are separated by SP, and RFC 2821 mailboxes are
    ASCII: an address with a space, a control character or a non-ASCII
    character cannot be asked.
    """
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and _is_vchars(address)


def credentials(secret: str | None, query_id: str, address: str) -> str | None:
    """The section 2.2 digest, base64(MD5(secret ":" mailbox)); None when anonymous (section 4).

    ``query_id`` is not used: draft -06 has no query id, and the digest
    covers only the secret and the mailbox.
    """
    if secret is None:
        return None
    digest_text = f"{secret}:{address}".encode("ascii")
    return base64.b64encode(hashlib.md5(digest_text).digest()).decode("ascii")


def encode_query(query_id: str, address: str, secret: str | None) -> bytes:
    """The section 2.1 query-string: ``mailbox`` or ``mailbox SP "d=" digest``.

    ``query_id`` is not sent (the draft has none); no tag-list is sent.
    """
    if not expressible(address):
        raise ValueError("the address cannot be put in a Minger query")
    digest = credentials(secret, query_id, address)
    query = address if digest is None else f"{address} d={digest}"
    return query.encode("ascii")


def decode_answer(datagram: bytes, mailbox: str | None = None) -> tuple[str, int, str]:
    """(mailbox, status, "") from a section 3 response-string; ValueError when it is not one.

    ``mailbox SP status`` as in section 3.2's examples; the ABNF's literal
    ``mailbox status`` (no SP) is accepted too when ``mailbox``, the
    address that was asked, is given (without it a domain ending in a
    digit would be ambiguous). The status is one digit 0-5; anything
    else, or anything after it but a line end, is not a Minger answer.
    The third element is always "" (the draft's answer has no text);
    it is kept for callers.
    """
    try:
        text = datagram.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not a Minger answer") from None
    text = text.rstrip("\r\n")
    if len(text) < 2 or text[-1] not in "012345":
        raise ValueError("not a Minger answer")
    status = int(text[-1])
    head = text[:-1]
    if head.endswith(" "):
        answered = head[:-1]
    elif mailbox is not None and head.lower() == mailbox.lower():
        answered = head
    else:
        raise ValueError("not a Minger answer")
    if not expressible(answered):
        raise ValueError("not a Minger answer")
    return answered, status, ""


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, address: str):
        self.address = address
        self.answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            mailbox, status, _ = decode_answer(data, self.address)
        except ValueError:
            return
        # Section 3.1: the answer names the address that was asked. Domains
        # are case-insensitive and a server may change the case it echoes.
        if mailbox.lower() == self.address.lower() and not self.answer.done():
            self.answer.set_result(status)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nobody listens. Counted as a lost try.
        if not self.answer.done():
            self.answer.set_exception(ConnectionRefusedError("port unreachable"))


class MingerClient:
    def __init__(self, source: MingerSource):
        self.source = source

    async def _ask_once(self, address: str, secret: str | None) -> int:
        loop = asyncio.get_running_loop()
        transport, exchange = await loop.create_datagram_endpoint(
            lambda: _Exchange(address), remote_addr=(self.source.host, self.source.port)
        )
        try:
            transport.sendto(encode_query("", address, secret))
            return await asyncio.wait_for(exchange.answer, self.source.timeout_seconds)
        finally:
            transport.close()

    async def verify(self, address: str) -> Finding:
        try:
            secret = self.source.shared_secret()
        except LookupError as exc:
            raise SourceUnavailable(str(exc)) from None
        if not expressible(address):
            raise SourceUnavailable("minger: the address cannot be put in a query (draft section 2.1)")
        lost = "no answer"
        for _ in range(1 + self.source.retries):
            try:
                status = await self._ask_once(address, secret)
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
            if status == BAD_CREDENTIALS:
                what = "anonymous queries refused" if secret is None else "wrong shared secret"
                raise SourceUnavailable(f"minger: bad or missing credentials ({what})")
            if status == ACCESS_DENIED:
                raise SourceUnavailable("minger: access denied (this host is not allowed to ask)")
            raise SourceUnavailable("minger: invalid request")
        raise SourceUnavailable(f"minger {self.source.host}:{self.source.port}: {lost} after "
                                f"{1 + self.source.retries} tries")

    async def authenticate(self, address: str, password: str) -> bool | None:
        return False  # Minger only verifies addresses

    async def close(self) -> None:
        pass

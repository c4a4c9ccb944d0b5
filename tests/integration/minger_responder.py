"""A small Minger responder for the tests, after draft-hathcock-minger-06.

Written from the draft's text, not from Bulwark's client
(ingest/verification/minger.py), so that a mistake in one is not mirrored
in the other. What it does, by the draft's sections:

  2.1  A query is  mailbox [SP "d=" digest] [SP tag-list]; tag-list is
       tag-spec *(SP tag-spec), tag-spec = tag-name "=" tag-value, both
       1*(ALPHA / DIGIT / "_"), names case-sensitive, never "d", never
       repeated (2.2). Unknown tags are accepted and ignored.
  2.2  digest = base64 of the MD5 of  shared-secret ":" mailbox.
  3    It answers  mailbox SP status  (as in 3.2's examples), the mailbox
       as the query gave it.
  3.1  0 invalid request, 1 access denied (a peer not in ``allowed_ips``),
       2 bad or missing credentials, 3 no such address, 4 exists but
       cannot receive mail, 5 exists and is active.
  4    With a secret configured it refuses anonymous queries with 2 (the
       MUST of section 4); without one it answers anonymous queries and
       ignores any digest.

It listens on an ephemeral UDP port on loopback (the draft's port is 4069,
section 2) and counts the queries it answered.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading

_NAME = re.compile(r"[A-Za-z0-9_]+\Z")       # tag-name / tag-value, section 2.1
_MAILBOX = re.compile(r"[\x21-\x3f\x41-\x7e]+@[A-Za-z0-9.\-\[\]:]+\Z")  # Local-part "@" Domain, roughly


class MingerResponder:
    def __init__(self, secret: str | None, valid: set[str], inactive: set[str],
                 allowed_ips: set[str] | None = None):
        self.secret = secret
        self.valid = {a.lower() for a in valid}
        self.inactive = {a.lower() for a in inactive}
        self.allowed_ips = allowed_ips
        self.queries: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _expected_digest(self, mailbox: str) -> str:
        md5 = hashlib.md5()
        md5.update(self.secret.encode("ascii"))
        md5.update(b":")
        md5.update(mailbox.encode("ascii"))
        return base64.standard_b64encode(md5.digest()).decode("ascii")

    def answer(self, query: bytes, peer_ip: str) -> bytes | None:
        """The response-string for one query datagram (None: nothing to answer)."""
        try:
            text = query.decode("ascii")
        except UnicodeDecodeError:
            return None
        parts = text.split(" ")
        mailbox = parts[0]
        if not mailbox:
            return None
        status = self._status(mailbox, parts[1:], peer_ip)
        return f"{mailbox} {status}".encode("ascii")

    def _status(self, mailbox: str, rest: list[str], peer_ip: str) -> int:
        if self.allowed_ips is not None and peer_ip not in self.allowed_ips:
            return 1
        if not _MAILBOX.match(mailbox):
            return 0
        digest = None
        if rest and rest[0].startswith("d="):
            digest, rest = rest[0][2:], rest[1:]
            if not digest:
                return 0
        seen: set[str] = set()
        for spec in rest:
            name, eq, value = spec.partition("=")
            if not eq or not _NAME.match(name) or not _NAME.match(value) or name == "d" or name in seen:
                return 0
            seen.add(name)
        if self.secret is not None:
            if digest is None or digest != self._expected_digest(mailbox):
                return 2
        with self.lock:
            self.queries.append(mailbox.lower())
        if mailbox.lower() in self.valid:
            return 5
        if mailbox.lower() in self.inactive:
            return 4
        return 3

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            reply = self.answer(data, peer[0])
            if reply is not None:
                self.sock.sendto(reply, peer)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self.sock.close()

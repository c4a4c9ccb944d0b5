"""A small Minger responder (draft-hathcock-minger-06) for the tests.

Written separately from Bulwark's client (ingest/verification/minger.py) so
that a mistake in one is not mirrored in the other. It answers one datagram
per query on a UDP port:

    query:  MNGR 1.0 <query-id> <ANONYMOUS | hex HMAC-MD5(secret, "<query-id> <address>")> <address>
    answer: MNGR 1.0 <query-id> <status>

with status 5 (exists, accepts mail), 4 (exists, does not accept mail),
3 (no such address), 2 (malformed) or 1 (access denied: anonymous when a
secret is required, or a wrong hash). It counts the queries it answered.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading


class MingerResponder:
    def __init__(self, secret: str | None, valid: set[str], inactive: set[str]):
        self.secret = secret
        self.valid = {a.lower() for a in valid}
        self.inactive = {a.lower() for a in inactive}
        self.queries: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def status(self, query_id: str, credentials: str, address: str) -> int:
        if self.secret is not None:
            expected = hmac.new(self.secret.encode(), f"{query_id} {address}".encode(), hashlib.md5).hexdigest()
            if not hmac.compare_digest(credentials.lower(), expected):
                return 1
        address = address.lower()
        if address in self.valid:
            return 5
        if address in self.inactive:
            return 4
        return 3

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            fields = data.decode("ascii", "replace").split()
            if len(fields) != 5 or fields[0] != "MNGR":
                query_id = fields[2] if len(fields) > 2 else "0"
                self.sock.sendto(f"MNGR 1.0 {query_id} 2".encode(), peer)
                continue
            _, _, query_id, credentials, address = fields
            with self.lock:
                self.queries.append(address.lower())
            self.sock.sendto(f"MNGR 1.0 {query_id} {self.status(query_id, credentials, address)}".encode(), peer)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self.sock.close()

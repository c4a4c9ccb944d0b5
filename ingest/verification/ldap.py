"""LDAP and Active Directory sources (ldap3).

Verification: bind as the service account, search for the address with the
source's filter (the address escaped per RFC 4515, so it cannot change the
filter), paged, with connect, receive and server-side time limits. One entry
is a valid recipient; none is an invalid one. Active Directory entries whose
userAccountControl has ACCOUNTDISABLE (0x2) set are not valid recipients:
mail to a disabled user is refused like mail to a missing one.

AUTH of an account the source created: find its DN as above, then bind as
that DN with the password the client gave. The password goes to the
directory and nowhere else. An empty password is refused before any bind:
LDAP treats a bind with a DN and no password as an anonymous bind, which
"succeeds" (RFC 4513 section 5.1.2).

ldap3's synchronous strategy runs in a worker thread, so the SMTP event loop
keeps serving other sessions while the directory answers.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from urllib.parse import urlsplit

from ldap3 import NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from bulwark.policy.verification import ActiveDirectorySource, LdapSource

from .base import Finding, SourceUnavailable, invalid, valid

ACCOUNTDISABLE = 0x2


class LdapClient:
    def __init__(self, source: LdapSource):
        self.source = source
        self.active_directory = isinstance(source, ActiveDirectorySource)
        url = urlsplit(source.url)
        self.host = url.hostname or "localhost"
        self.port = url.port or (636 if url.scheme == "ldaps" else 389)

    # -- synchronous, in a worker thread ------------------------------------

    def _server(self) -> Server:
        mode = self.source.tls_mode
        tls = None
        if mode != "none":
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                version=ssl.PROTOCOL_TLS_CLIENT,
                ca_certs_file=str(self.source.ca_file) if self.source.ca_file else None,
            )
        return Server(
            self.host, port=self.port, use_ssl=mode == "ldaps", tls=tls, get_info=NONE,
            connect_timeout=self.source.timeout_seconds,
        )

    def _bound(self, user: str | None, password: str | None) -> Connection | None:
        """An open connection bound as ``user``; None when the bind is refused."""
        conn = Connection(
            self._server(), user=user, password=password, read_only=True,
            # ldap3 packs this into a socket option: whole seconds only.
            receive_timeout=max(1, math.ceil(self.source.timeout_seconds)), raise_exceptions=False,
        )
        conn.open()
        if self.source.tls_mode == "starttls" and not conn.start_tls():
            conn.unbind()
            raise SourceUnavailable(f"{self.source.name}: StartTLS refused by {self.host}:{self.port}")
        if user is None:
            return conn
        if not conn.bind():
            conn.unbind()
            return None
        return conn

    def _find(self, address: str) -> tuple[str, dict] | None:
        try:
            password = self.source.bind_password()
        except LookupError as exc:
            raise SourceUnavailable(str(exc)) from None
        conn = self._bound(self.source.bind_dn, password)
        if conn is None:
            raise SourceUnavailable(f"{self.source.name}: the service account's bind was refused")
        try:
            query = self.source.filter.replace("{address}", escape_filter_chars(address))
            attributes = ["userAccountControl"] if self.active_directory else []
            ok = conn.search(
                self.source.base_dn, query, search_scope=SUBTREE, attributes=attributes,
                paged_size=self.source.page_size, time_limit=max(1, int(self.source.timeout_seconds)),
            )
            result = conn.result or {}
            if not ok and result.get("result") not in (0, 32):  # 32: no such object (base DN)
                raise SourceUnavailable(f"{self.source.name}: search failed: {result.get('description')}")
            entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
            if not entries:
                return None
            entry = entries[0]
            return entry["dn"], entry.get("attributes") or {}
        finally:
            conn.unbind()

    def _verify(self, address: str) -> Finding:
        found = self._find(address)
        if found is None:
            return invalid(f"{self.source.name}: not in the directory")
        dn, attributes = found
        if self._disabled(attributes):
            return invalid(f"{self.source.name}: {dn} is a disabled account")
        return valid(f"{self.source.name}: {dn}")

    def _disabled(self, attributes: dict) -> bool:
        if not self.active_directory:
            return False
        control = attributes.get("userAccountControl")
        control = control[0] if isinstance(control, list) and control else control
        return bool(control) and bool(int(control) & ACCOUNTDISABLE)

    def _authenticate(self, address: str, password: str) -> bool:
        if not password:
            return False
        found = self._find(address)
        if found is None:
            return False
        dn, attributes = found
        if self._disabled(attributes):
            return False
        conn = self._bound(dn, password)
        if conn is None:
            return False
        conn.unbind()
        return True

    # -- asyncio ------------------------------------------------------------

    async def _in_thread(self, fn, *args):
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.source.timeout_seconds * 3)
        except SourceUnavailable:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            raise SourceUnavailable(f"{self.source.name}: no answer from {self.host}:{self.port}") from None
        except (LDAPException, OSError) as exc:
            # The type only: ldap3's messages can quote the request.
            raise SourceUnavailable(f"{self.source.name}: {type(exc).__name__} from {self.host}:{self.port}") from None

    async def verify(self, address: str) -> Finding:
        return await self._in_thread(self._verify, address)

    async def authenticate(self, address: str, password: str) -> bool | None:
        if not self.source.authenticate:
            return False
        try:
            return await self._in_thread(self._authenticate, address, password)
        except SourceUnavailable:
            return None

    async def close(self) -> None:
        pass

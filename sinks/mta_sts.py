"""MTA-STS (RFC 8461): a receiving domain's published promise of TLS.

A domain announces a policy with a TXT record at ``_mta-sts.DOMAIN``
(``v=STSv1; id=...``) and serves it over HTTPS at
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``. The policy names the MX
hosts that may receive its mail and a mode: ``enforce`` (deliver only over
TLS with a WebPKI-valid certificate for a matching MX, else defer),
``testing`` (deliver anyway, report failures) or ``none``.

The cache is the compacted ``delivery.mta-sts`` topic: every delivery
process reads it (a StateView) and writes what it fetched, so one fetch
serves them all and a restart refetches nothing that is still valid.

What is validated here, each a recorded, explained outcome (the RFC 8460
result types TLS reports use), never a crash:

- the TXT record: exactly one ``v=STSv1`` record with an ``id`` (3.1);
- the fetch: HTTPS with certificate validation, no redirects, status 200,
  ``text/plain``, at most 64 KB, a timeout (3.3);
- the policy: ``version: STSv1``, a ``mode``, a ``max_age`` of at most a
  year, and ``mx`` patterns unless the mode is ``none`` (3.2).

A policy is used until ``max_age`` runs out; a changed TXT id makes it
refetched sooner (5.1). When a refetch fails, the cached, unexpired policy
stays in force (5.1: "senders ... SHOULD continue to use the cached policy").
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from datetime import timedelta

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver

from schemas import events as ev
from schemas.events import utcnow

log = logging.getLogger(__name__)

#: RFC 8461 section 3.3: "policy bodies ... up to 64 KB".
MAX_POLICY_BYTES = 64 * 1024
#: RFC 8461 section 3.2: max_age is at most 31557600 (about a year).
MAX_AGE_LIMIT = 31557600
FETCH_TIMEOUT_SECONDS = 10.0
#: How long a failed fetch stands before the policy host is asked again.
FAILED_FETCH_RETRY = timedelta(minutes=5)
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(Exception):
    """A policy that cannot be used; ``result_type`` is its RFC 8460 name."""

    def __init__(self, result_type: str, detail: str):
        super().__init__(detail)
        self.result_type = result_type
        self.detail = detail


def parse_txt(strings: list[str]) -> str | None:
    """The id of an ``_mta-sts`` TXT record, or None if it is not one (RFC 8461 3.1)."""
    fields = {}
    for part in "".join(strings).split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str) -> dict:
    """mode, mx and max_age of a policy body; PolicyError when it is not valid (RFC 8461 3.2)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError("sts-policy-invalid", "the policy has no 'version: STSv1'")
    mode = (values.get("mode") or [None])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError("sts-policy-invalid", f"the policy's mode is {mode!r}")
    try:
        max_age = int((values.get("max_age") or [""])[0])
    except ValueError:
        raise PolicyError("sts-policy-invalid", "the policy has no numeric max_age") from None
    if not 0 <= max_age <= MAX_AGE_LIMIT:
        raise PolicyError("sts-policy-invalid", f"max_age {max_age} is out of range")
    mx = [m.lower().rstrip(".") for m in values.get("mx", []) if m]
    if mode != "none" and not mx:
        raise PolicyError("sts-policy-invalid", "the policy names no mx")
    return {"mode": mode, "mx": mx, "max_age": max_age}


def mx_matches(host: str, patterns: list[str]) -> bool:
    """RFC 8461 section 4.1: exact names, or "*.example.com" for one more label."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            head, _, tail = host.partition(".")
            if head and tail == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


class _DnsResolver(AbstractResolver):
    """aiohttp's host lookups through the delivery's own resolver (one DNS view)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver):
        self.resolver = resolver

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        from sinks.routing import addresses

        try:
            found = await addresses(self.resolver, host)
        except dns.exception.DNSException as exc:
            raise OSError(f"cannot resolve {host}: {type(exc).__name__}") from None
        if not found:
            raise OSError(f"{host} has no address")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in found]

    async def close(self) -> None:
        pass


class MtaStsResolver:
    """The MTA-STS policy in force for a domain, from the shared cache or fetched."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, ssl_context: ssl.SSLContext,
                 https_port: int = 443, view=None, publish=None):
        self.resolver = resolver
        self.ssl_context = ssl_context
        self.https_port = https_port
        #: StateView of delivery.mta-sts (None: a cache of this process only).
        self.view = view
        self.publish = publish
        self._local: dict[str, ev.MtaStsPolicyFetched] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def cached(self, domain: str) -> ev.MtaStsPolicyFetched | None:
        found = self.view.get(domain) if self.view is not None else None
        local = self._local.get(domain)
        if found is None or (local is not None and local.occurred_at > found.occurred_at):
            found = local
        return found

    async def policy(self, domain: str) -> ev.MtaStsPolicyFetched | None:
        """The policy to apply (mode set), a failed lookup (error set, mode None), or None: no MTA-STS."""
        domain = domain.lower()
        async with self._locks.setdefault(domain, asyncio.Lock()):
            return await self._policy(domain)

    async def _policy(self, domain: str) -> ev.MtaStsPolicyFetched | None:
        cached = self.cached(domain)
        valid = cached if cached is not None and cached.mode and cached.expires_at > utcnow() else None
        try:
            policy_id = await self._txt(domain)
        except dns.exception.DNSException:
            # RFC 8461 5.1: a lookup failure keeps a cached policy in force.
            return valid
        if policy_id is None:
            # No (valid) record: a cached policy stays until it expires (5.1),
            # so removing the record cannot silently switch enforcement off.
            return valid
        if valid is not None and valid.policy_id == policy_id:
            return valid
        if cached is not None and cached.mode is None and cached.policy_id == policy_id and \
                utcnow() - cached.occurred_at < FAILED_FETCH_RETRY:
            return cached  # failed a moment ago: not fetched (and recorded) again for every message
        fetched = await self._fetch(domain, policy_id)
        if fetched.mode is None and valid is not None:
            log.warning("MTA-STS policy of %s could not be refreshed (%s); the cached one stays", domain, fetched.error)
            return valid
        self._local[domain] = fetched
        if self.publish is not None:
            try:
                await self.publish(fetched)
            except Exception as exc:  # the cache is an optimisation; delivery goes on
                log.warning("could not record the MTA-STS policy of %s: %s", domain, exc)
        return fetched

    async def _txt(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        records = [r for r in records if r.startswith("v=STSv1")]
        # RFC 8461 3.1: more than one STSv1 record is as good as none.
        if len(records) != 1:
            return None
        return parse_txt([records[0]])

    async def _fetch(self, domain: str, policy_id: str) -> ev.MtaStsPolicyFetched:
        url = f"https://mta-sts.{domain}:{self.https_port}/.well-known/mta-sts.txt"
        if self.https_port == 443:
            url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        try:
            text = await self._get(url)
            fields = parse_policy(text)
        except PolicyError as exc:
            return ev.MtaStsPolicyFetched(domain=domain, policy_id=policy_id, error=exc.result_type, detail=exc.detail)
        now = utcnow()
        return ev.MtaStsPolicyFetched(
            domain=domain, policy_id=policy_id, mode=fields["mode"], mx=fields["mx"], max_age=fields["max_age"],
            expires_at=now + timedelta(seconds=fields["max_age"]), policy_text=text, occurred_at=now,
        )

    async def _get(self, url: str) -> str:
        connector = aiohttp.TCPConnector(resolver=_DnsResolver(self.resolver), ssl=self.ssl_context, force_close=True)
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                # RFC 8461 3.3: "HTTP 3xx redirects MUST NOT be followed".
                async with http.get(url, allow_redirects=False) as response:
                    if response.status != 200:
                        raise PolicyError("sts-policy-fetch-error", f"{url} answered HTTP {response.status}")
                    if response.content_type != "text/plain":
                        raise PolicyError("sts-policy-invalid", f"{url} is {response.content_type}, not text/plain")
                    body = b""
                    while chunk := await response.content.read(MAX_POLICY_BYTES + 1 - len(body)):
                        body += chunk
                        if len(body) > MAX_POLICY_BYTES:
                            raise PolicyError("sts-policy-invalid", f"{url} is larger than 64 KB")
                    return body.decode("utf-8", "replace")
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PolicyError("sts-webpki-invalid", f"{url}: certificate not valid: {exc.certificate_error}") from None
        except ssl.SSLError as exc:
            raise PolicyError("sts-webpki-invalid", f"{url}: TLS failed: {exc.reason or exc}") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise PolicyError("sts-policy-fetch-error", f"{url}: {type(exc).__name__}: {exc}") from None

"""Where a message for a domain goes: configured servers, a smarthost, or the domain's MX.

Local domains go to their mail servers from the policy (or the default
one); other domains to the smarthost when one is set, else to the servers
their MX records name (RFC 5321 section 5.1):

- MX records in preference order, equal preferences shuffled so that load
  spreads as the domain asked (5.1: "SHOULD randomize");
- no MX record: the domain's own address records, as an implicit MX;
- a null MX ("0 ."), RFC 7505: the domain accepts no mail, a permanent
  failure with 5.1.10 (RFC 7505 section 4.1), no attempt made;
- a domain that does not exist, or no address at all: permanent (5.1.2);
- a DNS failure (timeout, SERVFAIL): temporary (4.4.3), retried later.

Every MX host's addresses are looked up here, with the same resolver, so
that a test network (or a split-horizon DNS) can be named in one setting
(``BULWARK_DNS_RESOLVER``) and the connection goes to exactly the address
the routing chose, while TLS checks the certificate against the MX name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from bulwark import dns as shared_dns
from bulwark.policy.sections import SmtpCredentials

#: The resolver delivery asks. It lives in bulwark.dns, shared with the
#: stream worker's sender authentication checks; this name stays for delivery.
resolver_for = shared_dns.resolver_for


@dataclass(frozen=True)
class Route:
    """One server to try: its name (for TLS) and the address to connect to."""

    host: str
    port: int
    address: str | None = None
    #: The mail server "requires SMTP authentication": how to log in.
    auth: SmtpCredentials | None = None
    #: SHA-256 of the certificate (DER) a configured server must present.
    pin_sha256: str | None = None
    #: Found by MX lookup (the MTA-STS policy applies), not configured.
    from_mx: bool = False

    @property
    def connect_to(self) -> str:
        return self.address or self.host

    def __str__(self) -> str:
        if self.address and self.address != self.host:
            return f"{self.host}[{self.address}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass
class Destination:
    """The servers for one recipient domain, in the order to try them."""

    domain: str
    kind: str  # "local", "smarthost" or "mx"
    routes: list[Route] = field(default_factory=list)


class RouteError(Exception):
    """No route: ``status`` is the enhanced status code (RFC 3463) to report."""

    def __init__(self, status: str, text: str):
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


async def addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """IPv4 then IPv6 addresses of ``name``; [] when it has none (NXDOMAIN raises)."""
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            continue
        found += [r.address for r in answer]
    return found


async def mx_routes(resolver: dns.asyncresolver.Resolver, domain: str, port: int) -> list[Route]:
    """The routes for ``domain`` from DNS; raises RouteError when there are none."""
    try:
        answer = await resolver.resolve(domain, "MX", search=False)
        records = list(answer)
    except dns.resolver.NXDOMAIN:
        raise RouteError("5.1.2", f"domain {domain} does not exist") from None
    except dns.resolver.NoAnswer:
        records = []
    except dns.exception.DNSException as exc:
        raise RouteError("4.4.3", f"DNS lookup of {domain} MX failed: {type(exc).__name__}") from None

    try:
        if not records:
            # RFC 5321 5.1: no MX, so the domain itself is the mail server.
            found = await addresses(resolver, domain)
            if not found:
                raise RouteError("5.1.2", f"domain {domain} has no MX and no address")
            return [Route(domain, port, a, from_mx=True) for a in found]
        if any(str(r.exchange) == "." for r in records):
            # RFC 7505 section 3: a null MX is the only record; a domain that
            # publishes one with others is misconfigured, and the null MX wins.
            raise RouteError("5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for record in records:
            by_preference.setdefault(record.preference, []).append(str(record.exchange).rstrip(".").lower())
        routes: list[Route] = []
        for preference in sorted(by_preference):
            hosts = by_preference[preference]
            random.shuffle(hosts)
            for host in hosts:
                try:
                    found = await addresses(resolver, host)
                except dns.resolver.NXDOMAIN:
                    continue  # a dangling MX: the others may still work
                routes += [Route(host, port, a, from_mx=True) for a in found]
        if not routes:
            raise RouteError("5.1.2", f"no MX host of {domain} has an address")
        return routes
    except dns.exception.DNSException as exc:
        raise RouteError("4.4.3", f"DNS lookup for {domain} failed: {type(exc).__name__}") from None

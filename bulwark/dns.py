"""The DNS resolver every component asks, from one setting (``BULWARK_DNS_RESOLVER``).

Delivery (MX, MTA-STS and TLS-RPT records) and the content checks (SPF,
DKIM, DMARC and ARC records) resolve through the same server, so a test
network or a split-horizon DNS is named once. It lives here, beside the
settings, because both the stream worker and the sinks use it and neither
may import the other.

dnspython's asyncio resolver serves code on the event loop; the blocking
one serves libraries that do their own lookups synchronously (pyspf, dkimpy)
and run on a thread.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver


def nameserver(address: str) -> tuple[str, int]:
    """(host, port) of "ip", "ip:port" or "[ipv6]:port"; a bare IPv6 address has no port."""
    if address.count(":") == 1:  # "127.0.0.1:5353"; a bare IPv6 address has more colons
        host, _, text = address.partition(":")
        return host, int(text)
    if address.startswith("[") and "]:" in address:
        host, _, text = address[1:].partition("]:")
        return host, int(text)
    return address, 53


def _configure(resolver: dns.resolver.Resolver, address: str | None, timeout: float):
    if address:
        host, port = nameserver(address)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = timeout
    return resolver


def resolver_for(address: str | None, timeout: float = 10.0) -> dns.asyncresolver.Resolver:
    """An asyncio resolver asking ``address`` ("ip" or "ip:port"), or the system's."""
    resolver = dns.asyncresolver.Resolver(configure=not address)
    return _configure(resolver, address, timeout)


def blocking_resolver_for(address: str | None, timeout: float = 10.0) -> dns.resolver.Resolver:
    """The same, for code that runs on a thread and cannot await."""
    resolver = dns.resolver.Resolver(configure=not address)
    return _configure(resolver, address, timeout)

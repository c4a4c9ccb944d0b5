"""DKIM keys for the tests, their DNS records, and verification as a downstream does it.

``TestKeys`` writes an RSA-2048 and an Ed25519 key (as ``bulwark dkim keygen``
does) and gives the records to serve (``zone_records`` for NSD, or
``dnsfunc`` in memory). ``verify_all`` checks every DKIM-Signature of a
message with dkimpy, which is what a receiving server runs.
"""

from __future__ import annotations

from pathlib import Path

import dkim
import dns.resolver

from sinks.dkim_sign import generate_private_key, read_private_key, record_value, txt_strings, write_private_key


class TestKeys:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, domain: str, rsa_selector: str = "rsa2026", ed_selector: str = "ed2026"):
        self.directory, self.domain = directory, domain
        self.files: dict[str, Path] = {}
        self.records: dict[str, str] = {}
        for selector, algorithm in ((rsa_selector, "rsa-sha256"), (ed_selector, "ed25519-sha256")):
            self.add(selector, algorithm)
        self.rsa_selector, self.ed_selector = rsa_selector, ed_selector

    def add(self, selector: str, algorithm: str, use: str = "all") -> dict:
        path = self.directory / f"{self.domain}.{selector}.key"
        write_private_key(path, generate_private_key(algorithm))
        self.files[selector] = path
        self.records[selector] = record_value(read_private_key(path, algorithm), use)
        return self.policy_key(selector, algorithm, use)

    def policy_key(self, selector: str, algorithm: str, use: str = "all") -> dict:
        return {"domain": self.domain, "selector": selector, "algorithm": algorithm,
                "key_file": str(self.files[selector]), "use": use}

    def policy(self) -> dict:
        """The dkim_signing section with both keys."""
        return {"keys": [self.policy_key(self.rsa_selector, "rsa-sha256"),
                         self.policy_key(self.ed_selector, "ed25519-sha256")]}

    def zone_records(self) -> list[str]:
        """Lines for the domain's zone (relative names), each record split in 255-octet strings."""
        return [f"{s}._domainkey IN TXT " + " ".join(f'"{part}"' for part in txt_strings(value))
                for s, value in self.records.items()]

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's DNS lookup, answered from memory."""
        for selector, value in self.records.items():
            if name.decode().rstrip(".") == f"{selector}._domainkey.{self.domain}":
                return value.encode()
        return None


def nsd_dnsfunc(address: str):
    """dkimpy's DNS lookup through dnspython, asking the NSD at ``address`` ("ip:port")."""
    host, _, port = address.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = [host], int(port), 5

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        # A record's strings are one value (RFC 6376 3.6.2.2).
        return b"".join(answer[0].strings)

    return lookup


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature, topmost first."""
    from dkim.util import parse_tag_value

    headers, _ = dkim.rfc822_parse(message)
    return [parse_tag_value(value) for name, value in headers if name.lower() == b"dkim-signature"]


def verify_all(message: bytes, dnsfunc, tlsrpt=False) -> list[bool]:
    """dkimpy's verdict on each signature, topmost first (a downstream's view)."""
    results = []
    for i in range(len(signatures(message))):
        try:
            results.append(dkim.DKIM(message, tlsrpt=tlsrpt).verify(idx=i, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # a body hash mismatch, a missing key...: a failed signature
            results.append(False)
    return results

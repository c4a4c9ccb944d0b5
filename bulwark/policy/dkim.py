"""Policy section for outbound DKIM signing (``dkim_signing:``, sinks/dkim_sign.py).

Each key is a selector of a domain: its algorithm and the file its private
key is in. The key itself is never in the policy, which is published to
Kafka: only the file's path is. The file is read by the delivery process
alone, so its existence is not checked here (ingest and the stream workers
validate the same policy on hosts that have no key files); a missing or
unreadable file defers the mail it should sign, and ``bulwark dkim check``
says so before any mail does.

A domain has at most one key per algorithm and use: RSA and Ed25519 side
by side (a verifier without Ed25519 still has the RSA signature), and
optionally one more of each used only for TLS reports (a record with
``s=tlsrpt``, RFC 8460 section 3). Rotation replaces an entry with a new selector; two live RSA
keys for one domain would only be two signatures that say the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from bulwark.policy.sections import _Section, domain_name

if TYPE_CHECKING:
    from bulwark.policy import Policy

#: RFC 6376 3.1: a selector is one or more DNS labels.
_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]


class DkimKey(_Section):
    domain: str = Field(description="The d= domain: the From: domain of the mail it signs")
    selector: str = Field(description="The s= selector: the key's record is SELECTOR._domainkey.DOMAIN")
    algorithm: Algorithm = Field(default="rsa-sha256", description="rsa-sha256 (RFC 6376) or ed25519-sha256 (RFC 8463)")
    key_file: Path = Field(description="Absolute path of the private key (PEM), readable by the delivery process")
    use: Literal["all", "tlsrpt"] = Field(
        default="all",
        description="all: every message from the domain; tlsrpt: only its TLS reports (a record with s=tlsrpt)",
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value)

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        value = str(value).strip().lower()
        if not _SELECTOR.match(value):
            raise ValueError(f"{value!r} is not a selector (DNS labels: letters, digits, '-', separated by '.')")
        return value

    @field_validator("key_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not Path(value).is_absolute():
            raise ValueError(f"{value} is relative: give the absolute path the delivery process reads it from")
        return value


class DkimSigning(_Section):
    """Outbound DKIM signing of the organisation's mail (docs/admin-guide.md, "DKIM signing")."""

    enabled: bool = Field(default=True, description="Sign with the keys below (nothing is signed without keys)")
    keys: list[DkimKey] = Field(default_factory=list)


def signing_domains(policy: "Policy") -> set[str]:
    """Domains a key may be for: the local domains, the gateway's hostname (its
    DSNs and notifications come from it) and the TLS reports' sender domain."""
    report_from = policy.tls.tls_reporting.report_from
    return {*policy.local_domains, policy.hostname.lower().rstrip("."),
            *([report_from.rpartition("@")[2].lower()] if report_from else [])}


def dkim_problems(policy: "Policy") -> list[tuple[tuple, str]]:
    """(location, message) for every key the policy cannot sign with as written."""
    problems = []
    allowed = signing_domains(policy)
    seen_selectors: dict[tuple[str, str], int] = {}
    seen_kinds: dict[tuple[str, str, str], int] = {}
    for i, key in enumerate(policy.dkim_signing.keys):
        where = ("dkim_signing", "keys", i)
        if key.domain not in allowed:
            problems.append(((*where, "domain"), f"{key.domain} is not a local domain, the hostname or the TLS "
                                                 "reports' sender domain: Bulwark signs only its own mail"))
        first = seen_selectors.setdefault((key.domain, key.selector), i)
        if first != i:
            problems.append(((*where, "selector"), f"{key.selector}._domainkey.{key.domain} is already key {first}: "
                                                   "one selector has one record, so one key"))
        first = seen_kinds.setdefault((key.domain, key.algorithm, key.use), i)
        if first != i:
            problems.append(((*where, "algorithm"), f"key {first} is already the {key.algorithm} key of {key.domain}"
                                                    f"{' for TLS reports' if key.use == 'tlsrpt' else ''}: to rotate, "
                                                    "replace that entry with the new selector"))
    return problems

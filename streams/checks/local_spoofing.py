"""Spoofing of local domains: Internet mail whose From: is a local domain, and that DMARC does not authenticate.

The organisation's own mail reaches the gateway from its domain mail
servers or authenticated users, never from the Internet; so mail from the
Internet claiming a local domain (or a subdomain of one) in its From: must
prove it with DMARC: an aligned SPF or DKIM pass, whatever the domain's own
record asks (a local domain still at p=none, or with no record at all, is
protected as well), or a trusted forwarder's intact ARC chain
(checks.arc.trusted_forwarders).

Results: ``LOCAL_DOMAIN_SPOOFED`` (hit; refused by default, ``when_spoofed``),
``LOCAL_DOMAIN_UNVERIFIED`` (fail: the local domain's DMARC record could not
be looked up and nothing aligned passed; quarantined), and
``LOCAL_DOMAIN_AUTHENTICATED`` / ``LOCAL_DOMAIN_EXEMPT`` (pass: the client is in
``exempt_networks``, e.g. a newsletter service sending as a local domain
that cannot sign for it). No result when the From: names no local domain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from bulwark.networks import checked_networks, in_networks
from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import ACTION, judged
from streams.message import Message

NAME = "local_spoofing"
DESCRIPTION = "Internet mail with a local domain in its From: that DMARC does not authenticate"

SPOOFED = "LOCAL_DOMAIN_SPOOFED"
UNVERIFIED = "LOCAL_DOMAIN_UNVERIFIED"
AUTHENTICATED = "LOCAL_DOMAIN_AUTHENTICATED"
EXEMPT = "LOCAL_DOMAIN_EXEMPT"


class Settings(CheckSettings):
    when_spoofed: Literal["refuse", "quarantine"] = Field(
        default="refuse", description="What happens to a spoofed local From: refuse it or quarantine it")
    exempt_networks: list[str] = Field(
        default_factory=list,
        description="Client addresses or CIDR ranges that may send as a local domain unauthenticated "
        "(better: have them sign with DKIM for the domain)")

    @field_validator("exempt_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return checked_networks(value)


DEFAULT_ACTIONS = {SPOOFED: "reject", UNVERIFIED: "quarantine"}


def actions(settings: Settings) -> dict[str, str]:
    return {SPOOFED: ACTION[settings.when_spoofed]}


def _local(domain: str, local_domains: list[str]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in local_domains)


def _exempt(client_ip: str, networks: list[str]) -> bool:
    return in_networks(client_ip, networks)


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message) or message.policy is None:
        return []
    who = sender_auth.author(message)
    local = sorted(d for d in who.domains if _local(d, message.policy.local_domains))
    if not local:
        return []

    def result(name: str, outcome: str, detail: str) -> list[CheckResult]:
        return [CheckResult(check=NAME, name=name, outcome=outcome, evidence=local,
                            detail=f"From: {', '.join(a for _, a in who.addresses)} from "
                                   f"{message.envelope.client_ip}: {detail}")]

    if _exempt(message.envelope.client_ip, settings.exempt_networks):
        return result(EXEMPT, "pass", "the client is in exempt_networks")
    problem = who.problem()
    if problem:  # a local From: beside another, or several: which one the reader sees is anyone's guess
        return result(SPOOFED, "hit", problem)
    d = await sender_auth.dmarc_result(message)
    if d.result == "pass":
        return result(AUTHENTICATED, "pass", f"DMARC pass ({d.detail})")
    if d.forwarder:
        return result(AUTHENTICATED, "pass", "; ".join(d.notes))
    if d.spf_aligned or d.dkim_aligned:  # no usable record, but an aligned identifier passed
        return result(AUTHENTICATED, "pass", f"aligned {'SPF' if d.spf_aligned else 'DKIM'} pass ({d.detail})")
    if d.result == "temperror":
        return result(UNVERIFIED, "fail", d.detail)
    return result(SPOOFED, "hit", f"DMARC {d.result}: {d.detail}")

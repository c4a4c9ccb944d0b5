"""ARC (RFC 8617): is the Authenticated Received Chain of a forwarded message intact?

A mailing list or forwarder that changes a message breaks its DKIM
signatures and SPF; if it is ARC-capable, it sealed what it saw on arrival
(its ARC-Authentication-Results) into an ARC set. The chain is validated
with dkimpy through the project's resolver (streams/sender_auth.py). When it
validates and its newest set was sealed by a **trusted forwarder** (a domain
listed in ``trusted_forwarders``, or a subdomain of one) whose sealed results
say the message passed DMARC (or carried an aligned DKIM or SPF pass), the
dmarc and local_spoofing checks let a DMARC failure pass
(``DMARC_TRUSTED_FORWARDER``). No forwarder is trusted by default: only
forwarders the organisation knows, and whose ARC sets it has checked, belong
on the list.

Results: ``ARC_PASS``, ``ARC_NONE`` (no ARC sets; pass), ``ARC_FAIL`` (hit),
``ARC_TEMPERROR`` (a key could not be fetched; fail). None changes the
action by itself (delivered by default): a broken chain is no worse than no
chain.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from bulwark.auth_results import resinfo
from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import domains, judged
from streams.message import Message

NAME = "arc"
DESCRIPTION = "ARC (RFC 8617) chain validation; trusted forwarders' results may override a DMARC failure"

PASS = "ARC_PASS"
FAIL = "ARC_FAIL"
NONE = "ARC_NONE"
TEMPERROR = "ARC_TEMPERROR"

NAMES = {"pass": PASS, "fail": FAIL, "none": NONE, "temperror": TEMPERROR}
OUTCOME = {"pass": "pass", "none": "pass", "fail": "hit", "temperror": "fail"}


class Settings(CheckSettings):
    trusted_forwarders: list[str] = Field(
        default_factory=list,
        description="ARC sealer domains (the d= of their ARC-Seal; subdomains included) whose sealed results may "
        "override a DMARC failure, e.g. the organisation's mailing list service")

    @field_validator("trusted_forwarders")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return domains(value)


DEFAULT_ACTIONS = {FAIL: "deliver", TEMPERROR: "deliver"}


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message):
        return []
    chain = await sender_auth.arc_result(message)
    newest = chain.sets[0] if chain.sets else None
    sealers = [f"i={s.instance} {s.sealer}" for s in chain.sets]
    message.authentication_results["arc"] = [resinfo(
        "arc", chain.result, [("smtp.remote-ip", message.envelope.client_ip)],
        comment=", ".join(sealers) or None, reason=None if chain.result in ("pass", "none") else chain.detail)]
    detail = chain.detail
    if newest is not None:
        trusted = any(newest.sealer == t or newest.sealer.endswith("." + t) for t in settings.trusted_forwarders)
        detail += f"; newest set i={newest.instance} sealed by {newest.sealer}" + (" (trusted)" if trusted else "")
    return [CheckResult(check=NAME, name=NAMES[chain.result], outcome=OUTCOME[chain.result], detail=detail,
                        evidence=[s.sealer for s in chain.sets])]

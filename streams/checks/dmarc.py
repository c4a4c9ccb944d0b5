"""DMARC (RFC 7489): does the From: domain's owner vouch for this message, and what does it ask?

The From: domain's DMARC record (or its Organizational Domain's) is found
through the project's resolver; the message passes when SPF (MAIL FROM) or
a DKIM signature passed for a domain aligned with the From: domain
(streams/sender_auth.py says how, and why it is evaluated here). When it
fails, the domain's policy (``p``, ``sp`` for a subdomain, after ``pct``)
names the result, and the result's action follows the policy file:

- ``DMARC_FAIL_REJECT``: the domain asks for refusal; refused by default
  (``when_reject``), at the end of DATA when the verdict comes in time
  (policy ``inline_refusal``), else held in the quarantine;
- ``DMARC_FAIL_QUARANTINE``: quarantined by default (``when_quarantine``);
- ``DMARC_FAIL_NONE``: the domain asks for nothing (p=none, monitoring);
  delivered by default (``when_none``);
- ``DMARC_TRUSTED_FORWARDER`` (pass): it failed, but a trusted forwarder's
  intact ARC chain vouches that it passed when the forwarder received it
  (checks.arc.trusted_forwarders);
- ``DMARC_PASS`` and ``DMARC_NONE`` (no record: the domain takes no part) pass;
- ``DMARC_TEMPERROR`` (fail): the record, or an aligned identifier, could not
  be looked up; ``DMARC_PERMERROR`` (hit): several or unusable records, so no
  policy applies. Both are delivered by default: a DNS problem at the
  sender's domain is no evidence of forgery (local domains are held by the
  local_spoofing check);
- ``DMARC_BAD_FROM``: no single From: domain to judge (no From:, several
  From: fields, or addresses in several domains), the classic way to show one
  sender and be judged as another; quarantined by default.
"""

from __future__ import annotations

from pydantic import Field

from bulwark.auth_results import resinfo
from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import ACTION, Choice, judged
from streams.message import Message

NAME = "dmarc"
DESCRIPTION = "DMARC (RFC 7489) alignment of SPF and DKIM with the From: domain, and its policy"

PASS = "DMARC_PASS"
NONE = "DMARC_NONE"
FAIL_REJECT = "DMARC_FAIL_REJECT"
FAIL_QUARANTINE = "DMARC_FAIL_QUARANTINE"
FAIL_NONE = "DMARC_FAIL_NONE"
TRUSTED_FORWARDER = "DMARC_TRUSTED_FORWARDER"
TEMPERROR = "DMARC_TEMPERROR"
PERMERROR = "DMARC_PERMERROR"
BAD_FROM = "DMARC_BAD_FROM"

FAILED = {"reject": FAIL_REJECT, "quarantine": FAIL_QUARANTINE, "none": FAIL_NONE}


class Settings(CheckSettings):
    when_reject: Choice = Field(
        default="refuse", description="A failure under p=reject: refuse (inline when the verdict comes in time), "
        "quarantine, tag or deliver")
    when_quarantine: Choice = Field(default="quarantine", description="A failure under p=quarantine")
    when_none: Choice = Field(default="deliver", description="A failure under p=none (the domain only monitors)")


DEFAULT_ACTIONS = {FAIL_REJECT: "reject", FAIL_QUARANTINE: "quarantine", FAIL_NONE: "deliver",
                   TEMPERROR: "deliver", PERMERROR: "deliver", BAD_FROM: "quarantine"}


def actions(settings: Settings) -> dict[str, str]:
    return {FAIL_REJECT: ACTION[settings.when_reject], FAIL_QUARANTINE: ACTION[settings.when_quarantine],
            FAIL_NONE: ACTION[settings.when_none]}


def _clause(d: sender_auth.DmarcResult) -> str:
    comment = None
    if d.record is not None:
        comment = f"p={d.record.p}" + (f" sp={d.record.sp}" if d.record.sp else "") + \
            (f" pct={d.record.pct}" if d.record.pct < 100 else "") + f" dis={d.disposition}"
    reason = None
    if d.forwarder:
        reason = "; ".join(d.notes)
    elif d.result in ("temperror", "permerror"):
        reason = d.detail
    applied = "none" if d.forwarder else d.disposition
    policy = [("policy.dmarc", applied)] if d.record is not None and d.result == "fail" else []
    return resinfo("dmarc", d.result, [("header.from", d.from_domain), *policy], comment=comment, reason=reason)


def _name(d: sender_auth.DmarcResult) -> tuple[str, str]:
    if d.result == "permerror" and d.from_domain is None:
        return BAD_FROM, "hit"
    if d.result == "fail":
        return (TRUSTED_FORWARDER, "pass") if d.forwarder else (FAILED[d.disposition], "hit")
    return {"pass": (PASS, "pass"), "none": (NONE, "pass"), "temperror": (TEMPERROR, "fail"),
            "permerror": (PERMERROR, "hit")}[d.result]


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message):
        return []
    d = await sender_auth.dmarc_result(message)
    message.authentication_results["dmarc"] = [_clause(d)]
    name, outcome = _name(d)
    detail = d.detail
    if d.record is not None:
        detail = f"{d.from_domain}: {d.result} under p={d.policy} (record at _dmarc.{d.record.domain}); {detail}"
    if d.notes:
        detail += "; " + "; ".join(d.notes)
    return [CheckResult(check=NAME, name=name, outcome=outcome, detail=detail,
                        evidence=[d.from_domain] if d.from_domain else [])]

"""SPF (RFC 7208): may the client send for its MAIL FROM domain, and for its HELO name?

Both identities are checked (RFC 7208 2.3 recommends HELO; for the null
sender, postmaster@HELO stands for MAIL FROM, 2.4) with the client address
and HELO name on the envelope, through the project's DNS resolver
(streams/sender_auth.py: pyspf, and why).

Results, one per identity (``SPF_HELO_...`` for HELO): ``SPF_PASS``,
``SPF_NEUTRAL`` and ``SPF_NONE`` (pass); ``SPF_FAIL``, ``SPF_SOFTFAIL``,
``SPF_PERMERROR`` (hit: a broken record); ``SPF_TEMPERROR`` (fail: DNS could
not answer). Every one is delivered by default but a fail, which is tagged
(``when_fail``): an SPF fail alone is not refused, because forwarding breaks
SPF and DMARC, which judges the From: domain with SPF's result, is where a
domain asks for refusal (RFC 7489 10.1 warns that refusing on SPF before
DMARC would refuse mail DMARC lets through).
"""

from __future__ import annotations

from pydantic import Field

from bulwark.auth_results import resinfo
from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import ACTION, Choice, judged
from streams.message import Message

NAME = "spf"
DESCRIPTION = "SPF (RFC 7208) for the MAIL FROM domain and the HELO name"

RESULTS = ("pass", "neutral", "none", "fail", "softfail", "permerror", "temperror")
OUTCOME = {"pass": "pass", "neutral": "pass", "none": "pass", "fail": "hit", "softfail": "hit",
           "permerror": "hit", "temperror": "fail"}


def result_name(identity: str, result: str) -> str:
    return f"SPF_{'HELO_' if identity == 'helo' else ''}{result.upper()}"


class Settings(CheckSettings):
    when_fail: Choice = Field(
        default="tag", description="What an SPF fail (of MAIL FROM or HELO) does: refuse, quarantine, tag or "
        "deliver; DMARC decides for domains that ask for refusal")
    check_helo: bool = Field(default=True, description="Also check the HELO name (RFC 7208 2.3)")


DEFAULT_ACTIONS = {
    **{result_name(i, r): "deliver" for i in ("mailfrom", "helo") for r in RESULTS if OUTCOME[r] != "pass"},
    result_name("mailfrom", "fail"): "tag",
    result_name("helo", "fail"): "tag",
}


def actions(settings: Settings) -> dict[str, str]:
    return {result_name(i, "fail"): ACTION[settings.when_fail] for i in ("mailfrom", "helo")}


def _clause(r: sender_auth.SpfResult) -> str:
    prop = ("smtp.mailfrom", r.subject) if r.identity == "mailfrom" else ("smtp.helo", r.subject)
    return resinfo("spf", r.result, [prop], reason=None if r.result == "pass" else r.explanation or None)


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message):
        return []
    mailfrom, helo = await sender_auth.spf_results(message)
    found = [mailfrom] + ([helo] if settings.check_helo and helo.subject else [])
    message.authentication_results["spf"] = [_clause(r) for r in found]
    return [
        CheckResult(check=NAME, name=result_name(r.identity, r.result), outcome=OUTCOME.get(r.result, "fail"),
                    detail=f"{r.identity} {r.subject or '(none)'} from {message.envelope.client_ip}: {r.result}"
                    + (f" ({r.explanation})" if r.explanation else ""),
                    evidence=[r.domain] if r.domain else [])
        for r in found
    ]

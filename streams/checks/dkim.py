"""DKIM (RFC 6376): every signature verified, RSA and Ed25519 (RFC 8463).

Keys are fetched through the project's DNS resolver (streams/sender_auth.py:
dkimpy, and why). RFC 8301 is applied: rsa-sha1 signatures and RSA keys
under 1024 bits are not accepted.

Results, one per DKIM-Signature field: ``DKIM_PASS``; ``DKIM_FAIL`` (the
signature or the body hash did not verify); ``DKIM_PERMERROR`` (a malformed
signature, no key or a revoked or unusable one); ``DKIM_TEMPERROR`` (the key
could not be fetched); ``DKIM_NONE`` when the message is not signed. A bad
signature makes a message no worse than an unsigned one (RFC 6376 6.3), so
every result is delivered by default: DMARC decides what an absent aligned
signature means for the From: domain.
"""

from __future__ import annotations

from pydantic import Field

from bulwark.auth_results import resinfo
from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import judged
from streams.message import Message

NAME = "dkim"
DESCRIPTION = "DKIM (RFC 6376) signatures, RSA and Ed25519, each verified"

PASS = "DKIM_PASS"
FAIL = "DKIM_FAIL"
PERMERROR = "DKIM_PERMERROR"
TEMPERROR = "DKIM_TEMPERROR"
NONE = "DKIM_NONE"

OUTCOME = {"pass": "pass", "fail": "hit", "permerror": "hit", "temperror": "fail"}


class Settings(CheckSettings):
    min_rsa_bits: int = Field(
        default=sender_auth.MIN_RSA_BITS, ge=sender_auth.MIN_RSA_BITS, le=4096,
        description="Shortest RSA key accepted (RFC 8301: at least 1024)")


DEFAULT_ACTIONS = {FAIL: "deliver", PERMERROR: "deliver", TEMPERROR: "deliver"}


def _clause(r: sender_auth.DkimResult) -> str:
    reason = None if r.result == "pass" else r.detail
    return resinfo("dkim", r.result, [("header.d", r.domain), ("header.s", r.selector), ("header.a", r.algorithm),
                                      ("header.b", r.b)], reason=reason)


def _result(r: sender_auth.DkimResult, settings: Settings) -> sender_auth.DkimResult:
    # The key's size is known once it verified; a policy may ask for more than RFC 8301's 1024 bits.
    bits = r.key_bits or 0
    if r.result == "pass" and r.algorithm and r.algorithm.startswith("rsa") and bits < settings.min_rsa_bits:
        return sender_auth.DkimResult("permerror", f"RSA key of {bits} bits is under the policy's "
                                      f"{settings.min_rsa_bits}", r.domain, r.selector, r.algorithm, r.b, bits)
    return r


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message):
        return []
    found = [_result(r, settings) for r in await sender_auth.dkim_results(message)]
    if not found:
        message.authentication_results["dkim"] = [resinfo("dkim", "none")]
        return [CheckResult(check=NAME, name=NONE, outcome="pass", detail="the message is not signed")]
    message.authentication_results["dkim"] = [_clause(r) for r in found]
    return [
        CheckResult(check=NAME, name=f"DKIM_{r.result.upper()}", outcome=OUTCOME.get(r.result, "fail"),
                    detail=r.describe, evidence=[r.domain] if r.domain else [])
        for r in found
    ]

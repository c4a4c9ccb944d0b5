"""Outbreak Protection: messages carrying a fingerprint marked as an outbreak.

The counting happens in streams/outbreak.py (distinct senders per
fingerprint over an event-time window); this check only looks the
message's fingerprints up in the table of marked outbreaks.
"""

from __future__ import annotations


from pydantic import Field

from schemas.events import CheckResult
from streams import outbreak
from streams.checks import CheckSettings
from streams.message import Message

NAME = "outbreak"
DESCRIPTION = "Fingerprints (attachments, normalised body, URL hosts) seen from many senders at once"

FOUND = "OUTBREAK_FOUND"
CLEAN = "OUTBREAK_OK"


class Settings(CheckSettings):
    threshold_senders: int = Field(
        default=20, ge=2, description="Distinct senders of one fingerprint within the window that mark an outbreak"
    )
    window_minutes: int = Field(default=60, ge=1, description="Minutes over which distinct senders are counted (fixed at worker start)")
    exempt_sender_domains: list[str] = Field(
        default_factory=list,
        description="Sender domains (and their subdomains) whose mail is neither counted nor marked: a partner "
                    "whose people write short notes above one long disclaimer looks like a campaign",
    )

    def exempts(self, sender: str) -> bool:
        domain = sender.rpartition("@")[2].strip(">").lower()
        return any(domain == d.lower() or domain.endswith("." + d.lower()) for d in self.exempt_sender_domains)


DEFAULT_ACTIONS = {FOUND: "quarantine"}


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if settings.exempts(message.envelope.mail_from):
        return [CheckResult(check=NAME, name=CLEAN, outcome="pass", detail="sender domain exempt")]
    marked, body_bands = [], []
    found = await outbreak.MEMO.of(message)  # shared with the observer: computed once
    for fingerprint, kind in found.items():
        record = outbreak.ACTIVE.get(fingerprint)
        if record and kind == "body":
            body_bands.append(record)
        elif record:
            marked.append(f"{kind} {fingerprint[:24]}… from {record['distinct_senders']} senders")
    if body_bands:  # one line for the body, however many of its bands are marked
        senders = max(r["distinct_senders"] for r in body_bands)
        marked.append(f"body similar to an outbreak ({len(body_bands)} of {outbreak.BANDS} bands) "
                      f"from {senders} senders")
    if marked:
        return [CheckResult(check=NAME, name=FOUND, outcome="hit", detail="part of an outbreak", evidence=marked)]
    return [CheckResult(check=NAME, name=CLEAN, outcome="pass")]

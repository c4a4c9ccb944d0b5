"""Antivirus: ClamAV scans the message and every part, archives included.

The guide's Virus Scanning settings, with its recommended values as the
defaults: scanning is on; an infected message is refused (``when_infected:
refuse``; the verdict action is ``reject``, which the quarantine sink holds
when the client already had its 250) or quarantined; a message that cannot be
scanned (clamd down or too slow, an encrypted archive or document, an archive
past clamd's limits) is quarantined, never delivered unscanned; the three
exclusions are off.

Results:

- ``VIRUS_FOUND``: evidence names each signature; ``version`` is clamd's
  engine and signature database version.
- ``ANTIVIRUS_UNSCANNABLE``: the message defeats scanning (encrypted, over a limit).
- ``ANTIVIRUS_FAIL``: clamd could not scan it (down, timed out, protocol error).
- ``ANTIVIRUS_CLEAN`` / ``ANTIVIRUS_SKIPPED`` (an exclusion applied): pass.

ClamAV's Office macro heuristic is left to the ``macros`` check, which reads
the same scan (one clamd pass per message serves both).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.events import CheckResult
from streams import clamav
from streams.checks._exclusions import ScanExclusions, exclusion
from streams.message import Message

NAME = "antivirus"
DESCRIPTION = "ClamAV scan of the whole message and each decoded part, archives included"

VIRUS_FOUND = "VIRUS_FOUND"
UNSCANNABLE = "ANTIVIRUS_UNSCANNABLE"
FAIL = "ANTIVIRUS_FAIL"
CLEAN = "ANTIVIRUS_CLEAN"
SKIPPED = "ANTIVIRUS_SKIPPED"

#: The guide's two choices for an infected message, and the verdict action each is.
WHEN_INFECTED = {"refuse": "reject", "quarantine": "quarantine"}


class Settings(ScanExclusions):
    when_infected: Literal["refuse", "quarantine"] = Field(
        default="refuse", description="What happens to an infected message: refuse it or quarantine it"
    )


DEFAULT_ACTIONS = {VIRUS_FOUND: "reject", UNSCANNABLE: "quarantine", FAIL: "quarantine"}


def actions(settings: Settings) -> dict[str, str]:
    return {VIRUS_FOUND: WHEN_INFECTED[settings.when_infected]}


def _where(replies: list[clamav.Reply]) -> str:
    return ", ".join(dict.fromkeys(r.target for r in replies))


def results(scan: clamav.MessageScan) -> list[CheckResult]:
    """The named results of one message's scan (pure: no I/O)."""
    found: list[CheckResult] = []
    for kind, name, outcome, label in (
        ("virus", VIRUS_FOUND, "hit", "infected"),
        ("unscannable", UNSCANNABLE, "fail", "cannot be scanned"),
        ("failed", FAIL, "fail", "not scanned"),
    ):
        targets = scan.of_kind(kind)
        if targets:
            found.append(CheckResult(
                check=NAME, name=name, outcome=outcome, version=scan.version,
                detail=f"{label}: {_where(targets)}",
                evidence=sorted({r.detail for r in targets if r.detail}),
            ))
    return found or [CheckResult(check=NAME, name=CLEAN, outcome="pass", version=scan.version)]


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    reason = exclusion(message, settings)
    if reason:
        return [CheckResult(check=NAME, name=SKIPPED, outcome="pass", detail=f"not scanned: {reason}")]
    return results(await clamav.scan(message))

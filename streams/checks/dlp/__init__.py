"""Data Leak Prevention: personal numbers, payment cards and secrets leaving in mail.

Over a hundred rules (``rules.py``; ``bulwark dlp rules`` lists them) look at
the subject, the text and HTML bodies and the text of attachments, archives
included (``extract.py``). Each rule reports its own result, ``DLP_<RULE>``,
with masked evidence (the last digits of a number at most, the kind and public
prefix of a secret), so the verdict and the quarantine say what was found
without carrying it.

As in the guide, every rule is on and sends what it finds to the
administrative quarantine; a rule applies to outbound mail unless the policy
says otherwise. Per rule, the policy can switch it off, change its direction,
its keywords and threshold, and its action: quarantine, redirect (to the
rule's own address or the policy's ``redirect_to``), reject, or tag (deliver
with an ``X-Bulwark-Tags`` header and, if the policy sets
``tag_subject_prefix``, a marked subject). The policy's ``actions:`` still has
the last word over any result name.

Encrypting the message, which the guide also offers, is not done: Bulwark has
no key directory or certificate store to encrypt to, and an S/MIME or PGP
envelope made without the recipient's key would only be a pretence.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from schemas.events import CheckResult
from streams.checks import CheckSettings
from streams.message import Message

from .extract import Extracted, Limits, extract_message
from .rules import RULES, BY_NAME, Category, Rule, RuleAction, RuleDirection
from .scan import ActiveRule, RuleFindings, scan

NAME = "dlp"
DESCRIPTION = "Data Leak Prevention: payment cards, bank accounts, national and health numbers, secrets"

CLEAN = "DLP_OK"
BOMB = "DLP_DECOMPRESSION_BOMB"
UNSCANNABLE = "DLP_UNSCANNABLE"

DEFAULT_ACTIONS = {
    **{rule.result_name: rule.default_action for rule in RULES},
    # An archive built to exhaust the scanner, or a document it cannot open,
    # could carry anything out: hold it for a person.
    BOMB: "quarantine",
    UNSCANNABLE: "quarantine",
}

#: Names the rule set in every result, so a verdict says which rules judged it.
RULESET_VERSION = "dlp-" + hashlib.sha256(
    "\n".join(f"{r.name}|{r.pattern.pattern}|{r.validator_name}|{','.join(r.keywords)}|{r.needs_keyword}"
              for r in RULES).encode()
).hexdigest()[:12]

_APPLIES = {
    "outbound": {"outbound"},
    "inbound": {"inbound"},
    "internal": {"internal"},
    "both": {"inbound", "outbound"},
    "all": {"inbound", "outbound", "internal"},
}


class RuleSettings(BaseModel):
    """One rule's settings; anything left out keeps the rule's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = None
    action: RuleAction | None = None
    redirect_to: str | None = Field(default=None, description="Where 'redirect' sends it; else the policy's redirect_to")
    direction: RuleDirection | None = None
    keywords: list[str] | None = Field(default=None, description="Replaces the rule's keywords")
    require_keyword: bool | None = None
    min_matches: PositiveInt | None = Field(default=None, description="Distinct numbers needed before it hits")

    @field_validator("redirect_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and (value.count("@") != 1 or " " in value or value.startswith("@") or value.endswith("@")):
            raise ValueError(f"{value!r} is not an email address")
        return value


#: A rule the policy says nothing about (frozen, so one instance serves all).
_UNSET = RuleSettings()


class ArchiveLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_depth: PositiveInt = 3
    max_members: PositiveInt = 1000
    max_file_bytes: PositiveInt = 25 * 1024 * 1024
    max_expanded_bytes: PositiveInt = 100 * 1024 * 1024
    max_ratio: PositiveInt = 100


class Settings(CheckSettings):
    rules: dict[str, RuleSettings] = Field(default_factory=dict, description="Per rule, by the names `bulwark dlp rules` lists")
    disabled_categories: list[Category] = Field(default_factory=list)
    #: Characters either side of a match searched for the rule's keywords.
    keyword_window: int = Field(default=100, ge=0, le=10_000)
    scan_attachments: bool = True
    max_evidence: int = Field(default=5, ge=1, le=50, description="Masked examples kept per rule")
    archives: ArchiveLimits = Field(default_factory=ArchiveLimits)

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: dict[str, RuleSettings]) -> dict[str, RuleSettings]:
        unknown = sorted(set(value) - set(BY_NAME))
        if unknown:
            raise ValueError(f"unknown DLP rule(s) {', '.join(unknown)}; `bulwark dlp rules` lists them")
        return value

    def limits(self) -> Limits:
        return Limits(**self.archives.model_dump())

    def direction(self, rule: Rule) -> str:
        own = self.rules.get(rule.name)
        return (own.direction if own and own.direction else None) or rule.default_direction

    def active(self, direction: str | None) -> list[ActiveRule]:
        """The enabled rules, with their settings, that apply to mail going ``direction`` (None: all)."""
        active = []
        for rule in RULES:
            own = self.rules.get(rule.name) or _UNSET
            enabled = own.enabled if own.enabled is not None else rule.category not in self.disabled_categories
            if not enabled or (direction is not None and direction not in _APPLIES[self.direction(rule)]):
                continue
            active.append(ActiveRule(
                rule,
                tuple(own.keywords) if own.keywords is not None else rule.keywords,
                own.require_keyword if own.require_keyword is not None else rule.needs_keyword,
                own.min_matches or 1,
            ))
        return active


# -- what the verdict asks of the check's settings ------------------------------


def actions(settings: Settings) -> dict[str, str]:
    """Each rule's action under these settings (the policy's ``actions:`` overrides)."""
    return {BY_NAME[n].result_name: s.action for n, s in settings.rules.items() if s.action}


def redirects(settings: Settings) -> dict[str, str]:
    """Rules that redirect to an address of their own."""
    return {BY_NAME[n].result_name: s.redirect_to for n, s in settings.rules.items() if s.redirect_to}


# -- the check -----------------------------------------------------------------------


def results_from(found: dict[str, RuleFindings], extracted: Extracted, settings: Settings,
                 scanned_rules: int) -> list[CheckResult]:
    results = []
    for name, entry in found.items():
        places = sorted({f.where for f in entry.findings})
        results.append(CheckResult(
            check=NAME,
            name=entry.rule.result_name,
            outcome="hit",
            detail=f"{entry.rule.detects}: {entry.distinct} found in {', '.join(places)}",
            evidence=[f"{f.where}: {f.masked}" for f in entry.findings[: settings.max_evidence]],
            version=RULESET_VERSION,
        ))
    for kind, name, outcome in (("bomb", BOMB, "hit"), ("unscannable", UNSCANNABLE, "fail")):
        problems = [p for p in extracted.problems if p.kind == kind]
        if problems:
            results.append(CheckResult(
                check=NAME, name=name, outcome=outcome,
                detail="; ".join(f"{p.where}: {p.detail}" for p in problems[: settings.max_evidence]),
                evidence=sorted({p.where for p in problems})[: settings.max_evidence],
                version=RULESET_VERSION,
            ))
    if not results:
        results.append(CheckResult(
            check=NAME, name=CLEAN, outcome="pass", version=RULESET_VERSION,
            detail=f"{scanned_rules} rules over {len(extracted.texts)} texts",
        ))
    return results


def scan_message(message: Message, settings: Settings, direction: str | None) -> list[CheckResult]:
    active = settings.active(direction)
    if not active:
        return _nothing_applies(direction)
    return _scan_with(message, settings, active)


def _nothing_applies(direction: str | None) -> list[CheckResult]:
    return [CheckResult(check=NAME, name=CLEAN, outcome="pass", version=RULESET_VERSION,
                        detail=f"no DLP rule applies to {direction} mail")]


def _scan_with(message: Message, settings: Settings, active: list[ActiveRule]) -> list[CheckResult]:
    extracted = extract_message(message, settings.limits(), attachments=settings.scan_attachments)
    found = scan(extracted.texts, active, settings.keyword_window)
    return results_from(found, extracted, settings, len(active))


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    # With the default rules (outbound only) inbound mail has nothing to
    # scan: answered here, without the thread hop (with building a settings
    # object per rule, 4 % of the worker's CPU for inbound mail; py-spy --gil
    # under bench/e2e_relay.py). Parsing documents is CPU work: a thread
    # keeps the worker's event loop (and its Kafka heartbeats) responsive meanwhile.
    active = settings.active(message.direction)
    if not active:
        return _nothing_applies(message.direction)
    return await asyncio.to_thread(_scan_with, message, settings, active)

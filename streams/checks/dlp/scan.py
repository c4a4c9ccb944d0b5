"""Running the rules over extracted text: matches, validation, keywords, masking.

Pure functions, shared by the check and by ``bulwark dlp test``. A match is
held in memory only long enough to validate and mask it; what leaves this
module is the masked form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .extract import Text
from .rules import Rule, mask


@dataclass(frozen=True)
class ActiveRule:
    """A rule with the administrator's settings applied."""

    rule: Rule
    keywords: tuple[str, ...]
    needs_keyword: bool
    min_matches: int = 1


@dataclass(frozen=True)
class Finding:
    where: str
    masked: str
    #: The keyword seen near it, if any: the reason a weak format was believed.
    keyword: str | None


@dataclass
class RuleFindings:
    rule: Rule
    findings: list[Finding] = field(default_factory=list)
    #: Distinct values found, for the min_matches threshold; never leaves the process.
    _distinct: set[str] = field(default_factory=set, repr=False)

    @property
    def distinct(self) -> int:
        return len(self._distinct)


@lru_cache(maxsize=512)
def keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for a rule's keywords, matched as whole words where they start or end in a Latin letter.

    Scripts written without spaces (身份证号码, マイナンバー) get no word
    boundary, or a keyword followed by its grammatical ending would never match.
    """
    if not keywords:
        return None
    parts = []
    for kw in sorted({k.lower() for k in keywords}, key=len, reverse=True):
        left = r"(?<![a-z0-9])" if kw[0].isascii() and kw[0].isalnum() else ""
        right = r"(?![a-z0-9])" if kw[-1].isascii() and kw[-1].isalnum() else ""
        parts.append(left + re.escape(kw) + right)
    return re.compile("|".join(parts))


def scan(texts: list[Text], rules: list[ActiveRule], window: int) -> dict[str, RuleFindings]:
    """Rule name -> what it found, for the rules that found anything valid."""
    found: dict[str, RuleFindings] = {}
    for text in texts:
        lowered = text.text.lower()
        # Several rules share a pattern (every card brand): find its matches once.
        matches: dict[re.Pattern[str], list[re.Match[str]]] = {}
        for active in rules:
            rule = active.rule
            # Cheap substring tests first: most rules cannot match most mail,
            # and a rule that needs a keyword needs it somewhere in the text.
            if rule.hints and not any(h in lowered for h in rule.hints):
                continue
            if active.needs_keyword and not any(k.lower() in lowered for k in active.keywords):
                continue
            keywords = keyword_pattern(active.keywords)
            if rule.pattern not in matches:
                matches[rule.pattern] = list(rule.pattern.finditer(text.text))
            for match in matches[rule.pattern]:
                value = rule.valid_value(match.group(0))
                if value is None:
                    continue
                start, end = match.start(), match.start() + len(value)
                keyword = None
                if keywords is not None:
                    near = keywords.search(lowered, max(0, start - window), end + window)
                    keyword = near.group(0) if near else None
                if active.needs_keyword and keyword is None:
                    continue
                entry = found.setdefault(rule.name, RuleFindings(rule))
                distinct = re.sub(r"[^0-9A-Za-z]", "", value).upper()
                if distinct not in entry._distinct:
                    entry._distinct.add(distinct)
                    entry.findings.append(Finding(text.where, mask(rule, value), keyword))
    return {
        name: entry
        for name, entry in found.items()
        if entry.distinct >= next(a.min_matches for a in rules if a.rule.name == name)
    }

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


def is_acronym(keyword: str) -> bool:
    """A keyword written in capitals ("SIN", "EIN") matches only in capitals: in lower case it is another word."""
    return keyword.isupper() and sum(c.isalpha() for c in keyword) >= 2


@lru_cache(maxsize=512)
def keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for a rule's keywords, matched as whole words where they start or end in a Latin letter.

    Scripts written without spaces (身份证号码, マイナンバー) get no word
    boundary, or a keyword followed by its grammatical ending would never match.
    """
    if not keywords:
        return None
    parts = []
    for kw in sorted(set(keywords), key=len, reverse=True):
        left = r"(?<![A-Za-z0-9])" if kw[0].isascii() and kw[0].isalnum() else ""
        right = r"(?![A-Za-z0-9])" if kw[-1].isascii() and kw[-1].isalnum() else ""
        word = re.escape(kw) if is_acronym(kw) else f"(?i:{re.escape(kw)})"
        parts.append(left + word + right)
    return re.compile("|".join(parts))


# What may stand between a label and its value: "Passport No. ", "Reisepass-Nr.: ", "license number is ".
_LABEL_GAP = r"(?i:[\s:#.=\-–]*(?:(?:number|num|no|nr|n°|nº|is|nummer|numéro|número|id)\.?[\s:#=\-–]*){0,2})\Z"

#: How far before a value its label may start.
LABEL_REACH = 60


@lru_cache(maxsize=512)
def label_pattern(keywords: tuple[str, ...]) -> re.Pattern[str] | None:
    """A keyword that labels what comes right after it, searched up to where a value starts."""
    words = keyword_pattern(keywords)
    return None if words is None else re.compile(f"(?P<keyword>{words.pattern}){_LABEL_GAP}")


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
            # A format with no validator is only as good as its keyword, and
            # "bring your passport" is near every booking reference in a
            # travel confirmation: the keyword must label the value.
            labelled = active.needs_keyword and rule.validator is None
            if rule.pattern not in matches:
                matches[rule.pattern] = list(rule.pattern.finditer(text.text))
            for match in matches[rule.pattern]:
                value = rule.valid_value(match.group(0))
                if value is None:
                    continue
                start, end = match.start(), match.start() + len(value)
                keyword = None
                if labelled:
                    label = label_pattern(active.keywords).search(text.text, max(0, start - LABEL_REACH), start)
                    keyword = label.group("keyword").lower() if label else None
                elif keywords is not None:
                    near = keywords.search(text.text, max(0, start - window), end + window)
                    keyword = near.group(0).lower() if near else None
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

"""Display-name impersonation: mail from outside addresses whose From: display name is one of the listed people.

"Cora Chief" <cora.chief@freemail.example> is the classic opening of a
payment fraud: the name is the executive's, the address anyone's. The policy
lists the people to protect (``people``: the executives, finance, HR...),
each with the outside addresses they really use, if any. A From: display
name matches a person when every word of the person's name is in it,
whatever the order, case, accents, punctuation or invisible characters
("CHIEF, Cora", "Córa Chief (CEO)"), and look-alike Cyrillic and Greek
letters read as the Latin ones. A display name that shows a local address
("ceo@example.com" <x@elsewhere.example>) is flagged too.

A From: address in a local domain is left to the local_spoofing check
(DMARC says whether it is genuine). Results: ``DISPLAY_NAME_IMPERSONATION``
(hit; quarantined by default, ``when_found``), ``DISPLAY_NAME_CLEAN`` (pass).
No result when no people are listed.
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.events import CheckResult
from streams import sender_auth
from streams.checks import CheckSettings
from streams.checks._sender_auth import ACTION, Choice, judged
from streams.message import Message

NAME = "impersonation"
DESCRIPTION = "From: display names of listed people (e.g. executives) on mail from outside addresses"

FOUND = "DISPLAY_NAME_IMPERSONATION"
CLEAN = "DISPLAY_NAME_CLEAN"

#: Cyrillic and Greek letters drawn like Latin ones (Unicode's confusables, the
#: lower-case letters a name is spelled with); NFKC leaves them as they are.
LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y",
})
_ADDRESS_IN_NAME = re.compile(r"[^\s<>\"'(),;:]+@([A-Za-z0-9.\-]+)")


def words(text: str) -> list[str]:
    """The words of a name as a reader sees them: no case, accents, punctuation or invisible characters."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cf"))
    text = text.casefold().translate(LOOKALIKES)
    return [w for w in re.split(r"[^\w]+|_", text) if w]


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="The name as it appears in a From: display name")
    addresses: list[str] = Field(default_factory=list,
                                 description="Outside addresses this person really sends from (not flagged)")

    @field_validator("name")
    @classmethod
    def _has_words(cls, value: str) -> str:
        if not words(value):
            raise ValueError(f"{value!r} has no letters or digits to match")
        return value

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            if not sender_auth.domain_of(item):
                raise ValueError(f"{item!r} is not an email address")
        return [item.strip().lower() for item in value]


class Settings(CheckSettings):
    people: list[Person] = Field(
        default_factory=list, description="People whose names outside senders may not use: {name, addresses}, "
        "or just the name")
    when_found: Choice = Field(default="quarantine", description="What an impersonation does: refuse, "
                               "quarantine, tag or deliver")

    @model_validator(mode="before")
    @classmethod
    def _names_alone(cls, data):
        # "people: [Cora Chief]" is the short form of [{name: Cora Chief}].
        if isinstance(data, dict) and isinstance(data.get("people"), list):
            data = {**data, "people": [{"name": p} if isinstance(p, str) else p for p in data["people"]]}
        return data


DEFAULT_ACTIONS = {FOUND: "quarantine"}


def actions(settings: Settings) -> dict[str, str]:
    return {FOUND: ACTION[settings.when_found]}


def _local(domain: str, local_domains: list[str]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in local_domains)


def findings(display: str, address: str, people: list[Person], local_domains: list[str]) -> list[str]:
    """Why this From: entry impersonates someone ([] when it does not)."""
    found = []
    shown = set(words(display))
    for person in people:
        wanted = words(person.name)
        if wanted and shown.issuperset(wanted) and address.lower() not in person.addresses:
            found.append(f"display name {display!r} is {person.name}'s, the address {address} is not theirs")
    for match in _ADDRESS_IN_NAME.finditer(display):
        domain = match.group(1).lower().rstrip(".")
        if _local(domain, local_domains) and match.group(0).lower() != address.lower():
            found.append(f"display name {display!r} shows the local address {match.group(0)}, "
                         f"the message is from {address}")
    return found


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    if not judged(message) or not settings.people:
        return []
    local_domains = message.policy.local_domains if message.policy is not None else []
    found, evidence = [], []
    for display, address in sender_auth.author(message).addresses:
        if not display or _local(sender_auth.domain_of(address), local_domains):
            continue
        why = findings(display, address, settings.people, local_domains)
        if why:
            found += why
            evidence.append(f"{display} <{address}>")
    if found:
        return [CheckResult(check=NAME, name=FOUND, outcome="hit", detail="; ".join(found), evidence=evidence)]
    return [CheckResult(check=NAME, name=CLEAN, outcome="pass")]

"""What the sender authentication checks share: the choices an administrator
has for a result, and which messages are judged. A leading underscore keeps
this module out of check discovery."""

from __future__ import annotations

from typing import Literal

from streams.message import Message

#: What a result may do, as the policy file says it, and the verdict action each is.
Choice = Literal["refuse", "quarantine", "tag", "deliver"]
ACTION = {"refuse": "reject", "quarantine": "quarantine", "tag": "tag", "deliver": "deliver"}


def judged(message: Message) -> bool:
    """Only mail from the Internet: the gateway's own senders authenticated to it already."""
    return message.direction == "inbound"


def domains(value: list[str]) -> list[str]:
    out = []
    for item in value:
        item = str(item).strip().lower().rstrip(".")
        if not item or "@" in item or " " in item or "." not in item:
            raise ValueError(f"{item!r} is not a domain name")
        out.append(item)
    return out

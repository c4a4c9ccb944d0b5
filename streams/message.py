"""A received message as the checks see it: envelope, raw bytes, MIME parts."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Iterator

from schemas.events import Direction, Envelope

if TYPE_CHECKING:
    from bulwark.policy import Policy


class UnreadableMessage(ValueError):
    """A message Python's MIME parser cannot follow (parts nested deeper than its recursion).

    A check that meets it fails by name (``<NAME>_FAIL``), which the policy
    quarantines: what could not be read was not checked.
    """


@dataclass(frozen=True)
class Part:
    content_type: str
    filename: str | None
    payload: bytes


@dataclass
class Message:
    message_id: str
    session_id: str | None
    envelope: Envelope
    direction: Direction
    raw: bytes
    #: The policy it is judged under: checks ask it about the client (is it a
    #: domain mail server? allow-listed?) for their exclusions.
    policy: "Policy | None" = None
    #: Work one check starts that another reuses while this message is judged
    #: (the clamd scan, read by both antivirus and macros), keyed by its owner.
    shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: What the sender authentication checks found, as RFC 8601 result
    #: clauses by method ("spf", "dkim", "dmarc", "arc"): the verdict's
    #: Authentication-Results header is made of them.
    authentication_results: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    _mime: EmailMessage | None = field(default=None, init=False, repr=False, compare=False)
    _unreadable: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def mime(self) -> EmailMessage:
        # email.policy.default never raises on malformed input: it records
        # defects and does its best, which is what a gateway needs. Except
        # for depth: its parser recurses once per nested multipart, so a few
        # hundred levels (a few kilobytes) exhaust Python's recursion. That
        # is remembered, so every check fails at once instead of each paying
        # for the parse again.
        if self._mime is None:
            if self._unreadable is not None:
                raise UnreadableMessage(self._unreadable)
            try:
                self._mime = email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[assignment]
            except RecursionError:
                self._unreadable = "MIME parts nested too deeply to parse"
                raise UnreadableMessage(self._unreadable) from None
        return self._mime  # type: ignore[return-value]

    @property
    def subject(self) -> str:
        return str(self.mime.get("Subject", ""))

    def parts(self) -> Iterator[Part]:
        """Every leaf part, decoded from its transfer encoding, in the order of the message."""
        # Walked with a stack rather than EmailMessage.walk(), whose
        # generators nest one level per MIME level.
        pending = [self.mime]
        while pending:
            part = pending.pop()
            if part.is_multipart():
                pending.extend(reversed(part.get_payload()))
                continue
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:  # a broken encoding is still a part to look at
                payload = part.get_payload(decode=False).encode("utf-8", "surrogateescape")
            yield Part(part.get_content_type(), part.get_filename(), payload)

    def attachments(self) -> Iterator[Part]:
        return (p for p in self.parts() if p.filename)

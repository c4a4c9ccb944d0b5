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
        # defects and does its best, which is what a gateway needs. Except:
        # - for depth: its parser recurses once per nested multipart, so a
        #   few hundred levels (a few kilobytes) exhaust Python's recursion;
        #   that is remembered, so every check fails at once instead of each
        #   paying for the parse again;
        # - on some parameters: "Content-Type: text/plain; a*" makes its
        #   header parser raise IndexError (found by tests/fuzz_atheris.py);
        #   then the message is read with compat32, which keeps headers as
        #   text: the structure, the parts and their names are all there.
        if self._mime is None:
            if self._unreadable is not None:
                raise UnreadableMessage(self._unreadable)
            try:
                self._mime = self._parse(email.policy.default)
            except UnreadableMessage:
                raise
            except Exception:
                self._mime = self._parse(email.policy.compat32)
        return self._mime  # type: ignore[return-value]

    def _parse(self, policy) -> EmailMessage:
        try:
            return email.message_from_bytes(self.raw, policy=policy)  # type: ignore[return-value]
        except RecursionError:
            self._unreadable = "MIME parts nested too deeply to parse"
            raise UnreadableMessage(self._unreadable) from None

    def _lenient(self) -> EmailMessage:
        """The message read again with compat32, after the default policy raised reading a header."""
        if self._mime is None or self._mime.policy is not email.policy.compat32:
            self._mime = self._parse(email.policy.compat32)
        return self._mime

    @property
    def subject(self) -> str:
        try:
            return str(self.mime.get("Subject", ""))
        except UnreadableMessage:
            raise
        except Exception:
            return str(self._lenient().get("Subject", ""))

    def parts(self) -> Iterator[Part]:
        """Every leaf part, decoded from its transfer encoding, in the order of the message."""
        try:
            leaves = self._leaves(self.mime)
        except UnreadableMessage:
            raise
        except Exception:
            # A part's header the default policy cannot parse, met when
            # reading its type or file name (see mime).
            leaves = self._leaves(self._lenient())
        return iter(leaves)

    @staticmethod
    def _leaves(root: EmailMessage) -> list[Part]:
        # Walked with a stack rather than EmailMessage.walk(), whose
        # generators nest one level per MIME level.
        leaves, pending = [], [root]
        while pending:
            part = pending.pop()
            if part.is_multipart():
                pending.extend(reversed(part.get_payload()))
                continue
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:  # a broken encoding is still a part to look at
                payload = part.get_payload(decode=False).encode("utf-8", "surrogateescape")
            leaves.append(Part(part.get_content_type(), part.get_filename(), payload))
        return leaves

    def attachments(self) -> Iterator[Part]:
        return (p for p in self.parts() if p.filename)

"""What every verification source client answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Result = Literal["valid", "invalid", "unavailable"]


@dataclass(frozen=True)
class Finding:
    """One source's answer about one address.

    ``detail`` is shown to administrators (events, ``bulwark sources test``):
    the source's own reason, never a credential.
    """

    result: Result
    detail: str


def valid(detail: str) -> Finding:
    return Finding("valid", detail)


def invalid(detail: str) -> Finding:
    return Finding("invalid", detail)


class SourceUnavailable(Exception):
    """The source could not answer (down, timed out, misconfigured).

    The message is written by Bulwark, never copied from a library's
    exception text, which could quote a request and the credentials in it.
    """

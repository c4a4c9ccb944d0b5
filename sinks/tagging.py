"""Marking a tagged message's subject for the recipient (the DLP "tag" action).

The message is edited as bytes, one header line, rather than parsed and
re-serialised: everything else, including the body and any DKIM-signed
headers other than Subject, reaches the recipient exactly as it was sent.
"""

from __future__ import annotations

import re
from email.header import Header

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_SUBJECT = re.compile(rb"^Subject:[ \t]*", re.IGNORECASE | re.MULTILINE)


def tag_subject(raw: bytes, prefix: str) -> bytes:
    """``raw`` with ``prefix`` put before its Subject (added when there is none); idempotent."""
    # A non-ASCII prefix goes in as an RFC 2047 encoded word.
    encoded = prefix.encode("ascii") if prefix.isascii() else Header(prefix, "utf-8").encode().encode("ascii")
    end = _HEADER_END.search(raw)
    head_end = end.start() if end else len(raw)
    match = _SUBJECT.search(raw, 0, head_end)
    if match is None:
        newline = b"\r\n" if b"\r\n" in raw[: head_end + 2] else b"\n"
        return b"Subject: " + encoded + newline + raw
    if raw[match.end():].startswith(encoded):
        return raw
    return raw[: match.end()] + encoded + b" " + raw[match.end():]

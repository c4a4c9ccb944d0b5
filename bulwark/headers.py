"""A raw message's header section, as ingest's guards and the content checks read it.

Both layers read header fields of messages they hold as bytes (IP Shielding
and Backscatter Protection at the end of DATA, DKIM and ARC in the worker).
Handing a parser the whole message makes it decode and feed every body line
only to drop them: three such reads per message were 9 % of ingest's CPU for
10 KB messages (py-spy --gil under bench/e2e_relay.py), more the larger the
message.
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesHeaderParser


def header_section(raw: bytes) -> bytes:
    """The bytes before the first empty line (all of them if there is none)."""
    ends = [at for blank in (b"\r\n\r\n", b"\n\n") if (at := raw.find(blank)) >= 0]
    return raw[:min(ends)] if ends else raw


def parse_headers(raw: bytes) -> Message:
    """The header fields of a message, parsed from its header section alone."""
    return BytesHeaderParser().parsebytes(header_section(raw))

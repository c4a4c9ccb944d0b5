"""The addresses an administrator may release a held message to.

Plain addresses only (``user@domain``, at most ten, comma-separated): they go
into RCPT TO as typed, so nothing that could smuggle SMTP (spaces, angle
brackets, line breaks) or name a route is accepted.
"""

from __future__ import annotations

import re

MAX = 10
#: RFC 5321's Mailbox in its common form: a dot-atom local part, a domain of labels.
ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                     r"@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


class AddressError(ValueError):
    pass


def release_addresses(text: str) -> list[str]:
    """The addresses in ``text`` (comma- or space-separated), or AddressError naming the first bad one."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise AddressError("give at least one address")
    if len(parts) > MAX:
        raise AddressError(f"at most {MAX} addresses")
    for part in parts:
        if len(part) > 254 or not ADDRESS.match(part):
            raise AddressError(f"{part[:80]!r} is not an address (user@domain)")
    return list(dict.fromkeys(parts))

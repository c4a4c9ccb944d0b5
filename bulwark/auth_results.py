"""The Authentication-Results header field (RFC 8601): written by the stream worker, placed by delivery.

The sender authentication checks (streams/checks/spf.py, dkim.py, dmarc.py,
arc.py) each write their result clauses (``resinfo``); the verdict carries the
header's value, with the gateway's hostname as the authserv-id; the delivery
sink adds it for the downstream and, first, removes from the message every
Authentication-Results field that already claims that authserv-id (RFC 8601
section 5: a forged one would otherwise be believed downstream).

Both halves are here, in neither streams/ nor sinks/, because each stage
needs one of them and neither may import the other.
"""

from __future__ import annotations

import re

#: The order of the methods in the header: the identities first (SPF, DKIM),
#: then what is concluded from them (DMARC), then the chain (ARC).
METHODS = ("spf", "dkim", "dmarc", "arc")

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~]+@[A-Za-z0-9.\-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FIELD = "Authentication-Results"


def value(text: str) -> str:
    """A property or reason value: as it is when it is a token or a plain
    address, else a quoted-string (RFC 8601 section 2.2). Control characters
    (a folded or forged line) never reach the header."""
    text = _CONTROL.sub("?", text)
    if _TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = _CONTROL.sub("?", text)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def resinfo(method: str, result: str, properties: list[tuple[str, str | None]] = (), *,
            reason: str | None = None, comment: str | None = None) -> str:
    """One result clause: ``method=result (comment) reason="..." ptype.property=value ...``.

    ``properties`` are ("header.d", value) pairs; a pair whose value is None is left out.
    """
    parts = [f"{method}={result}"]
    if comment:
        parts.append(_comment(comment))
    if reason:
        parts.append(f"reason={value(reason)}")
    parts += [f"{name}={value(v)}" for name, v in properties if v]
    return " ".join(parts)


def header_value(authserv_id: str, clauses: list[str]) -> str:
    """The field's value, folded one clause a line (each well under 998 octets)."""
    if not clauses:
        return f"{authserv_id}; none"
    return authserv_id + ";" + ";".join(f"\r\n\t{c}" for c in clauses)


def authserv_id(field_value: str) -> str | None:
    """The authserv-id a field's value starts with (comments and folding skipped), lower case."""
    text = field_value.strip()
    while text.startswith("("):  # CFWS before the id (RFC 8601 section 2.2)
        depth, i = 0, 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        text = text[i + 1:].strip()
    match = re.match(r'[^\s;()]+', text)
    return match.group(0).lower().rstrip(".") if match else None


def without_own(raw: bytes, own_id: str) -> bytes:
    """``raw`` without the Authentication-Results fields of its header that claim ``own_id``.

    Only the message's own header section is read (up to the first empty
    line); a folded field is judged unfolded and removed whole; everything
    else is left byte for byte.
    """
    own_id = own_id.lower().rstrip(".")
    lines = raw.splitlines(keepends=True)
    fields: list[list[bytes]] = []
    body_at = len(lines)
    for number, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            body_at = number
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    kept = [field for field in fields if not _claims(field, own_id)]
    if len(kept) == len(fields):
        return raw
    return b"".join(line for field in kept for line in field) + b"".join(lines[body_at:])


def _claims(field: list[bytes], own_id: str) -> bool:
    name, colon, first = field[0].partition(b":")
    if not colon or name.strip().lower() != FIELD.lower().encode():
        return False
    unfolded = b" ".join(line.strip() for line in [first, *field[1:]])
    return authserv_id(unfolded.decode("utf-8", "replace")) == own_id

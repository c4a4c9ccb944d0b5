"""Events as RFC 5424 syslog messages, and their framing over TLS (RFC 5425).

``<PRI>1 TIMESTAMP HOSTNAME bulwark - EVENT-TYPE [origin ...][bulwark@32473 ...][kafka@32473 ...] SUMMARY``

- PRI is the facility times 8 plus a severity from the event's (an outbreak
  or a disabled account: warning or error; a routine SMTP step: informational).
- The ``bulwark@32473`` element holds the event's fields: nested objects
  flattened with dots (``envelope.mail_from``), lists as the same name
  repeated (RFC 5424 allows it), lists of objects by index
  (``results.0.name``). A part whose names would not fit an SD-NAME (32
  printable characters, no '=', space, ']' or '"': a DMARC report's rows, a
  policy document) is given as JSON under its own name (``records.0.dkim_results.0``).
  32473 is the example enterprise number of
  RFC 5612: an organisation with its own number sets ``--enterprise-number``.
- The ``kafka@32473`` element says where the record was read (topic,
  partition, offset, key): with the event id, what a collector deduplicates by.
- In parameter values ``"``, ``\\`` and ``]`` are escaped with a backslash
  (RFC 5424 section 6.3.3); in values and in MSG, control characters are
  written as ``\\n``, ``\\r``, ``\\t`` or ``\\xNN``, so a message is always one line.
- MSG is the event's summary; it starts with a BOM when it is not ASCII
  (RFC 5424 section 6.4).

Over TLS each message is sent octet-counted, ``LENGTH SP MESSAGE`` (RFC
5425 section 4.3, RFC 6587 section 3.4.1).
"""

from __future__ import annotations

import json
import re

from .ecs import timestamp
from .facts import PRODUCT, PRODUCT_VERSION, ExportRecord, Facts, event_fields, facts as facts_of, syslog_severity

#: RFC 5612's example enterprise number; an organisation with its own sets it.
ENTERPRISE_NUMBER = 32473
APP_NAME = "bulwark"
NILVALUE = "-"
BOM = "\ufeff"

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{n}": 16 + n for n in range(8)},
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SD_NAME = re.compile(r"^[!#-<>-\\^-~]{1,32}$")  # PRINTUSASCII except '=', SP, ']', '"'


def facility_code(name: str) -> int:
    try:
        return FACILITIES[name]
    except KeyError:
        raise ValueError(f"unknown syslog facility {name!r} (one of {', '.join(FACILITIES)})") from None


def _controls(value: str) -> str:
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), value)


def escape_param(value: str) -> str:
    """A PARAM-VALUE: '"', '\\' and ']' escaped (RFC 5424 section 6.3.3), controls written out."""
    return _controls(value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]"))


def header_field(value: str | None, limit: int) -> str:
    """HOSTNAME, APP-NAME, PROCID or MSGID: printable US-ASCII, no spaces, at most ``limit`` characters."""
    if not value:
        return NILVALUE
    try:
        value = value.encode("idna").decode("ascii") if not value.isascii() else value
    except UnicodeError:
        return NILVALUE
    value = "".join(c for c in value if 33 <= ord(c) <= 126)
    return value[:limit] or NILVALUE


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """(name, value) pairs of an event's JSON: dotted names, lists repeated, nulls left out.

    A part whose names would not all be SD-NAMEs (over 32 characters, or a
    key with a space or '=') is given whole, as JSON, under its own name:
    nothing is dropped.
    """
    if isinstance(value, (dict, list)):
        pairs = []
        items = value.items() if isinstance(value, dict) else ((None, item) for item in value)
        for index, (key, item) in enumerate(items):
            if key is not None:
                name = f"{prefix}.{key}" if prefix else str(key)
            else:  # a list: scalars repeat the name, objects are numbered
                name = f"{prefix}.{index}" if isinstance(item, (dict, list)) else prefix
            pairs += flatten(item, name)
        if prefix and not all(_SD_NAME.match(name) for name, _ in pairs):
            return [(prefix, json.dumps(value, ensure_ascii=False, separators=(",", ":")))]
        return pairs
    if value is None:
        return []
    if isinstance(value, bool):
        return [(prefix, "true" if value else "false")]
    return [(prefix, str(value))]


def element(sd_id: str, params: list[tuple[str, str]]) -> str:
    body = "".join(f' {name}="{escape_param(value)}"' for name, value in params if _SD_NAME.match(name))
    return f"[{sd_id}{body}]"


def structured_data(record: ExportRecord, enterprise_number: int = ENTERPRISE_NUMBER, full: bool = True) -> str:
    origin = element("origin", [("software", PRODUCT), ("swVersion", PRODUCT_VERSION)])
    if record.event is None:
        params = [("type", record.type or "unknown"), ("version", record.version or "?"),
                  ("error", record.error or "")]
    elif full:
        params = flatten(event_fields(record.event))
    else:
        params = [("event_id", record.event.event_id), ("type", record.event.TYPE),
                  ("version", str(record.event.VERSION))]
    kafka = [("topic", record.topic), ("partition", str(record.partition)), ("offset", str(record.offset))]
    if record.key is not None:
        kafka.append(("key", record.key))
    return origin + element(f"bulwark@{enterprise_number}", params) + element(f"kafka@{enterprise_number}", kafka)


def message(record: ExportRecord, hostname: str, facility: int = FACILITIES["local0"], facts: Facts | None = None,
            msg: str | None = None, enterprise_number: int = ENTERPRISE_NUMBER) -> str:
    """The RFC 5424 message for a record.

    ``msg``: carry this (a CEF line, an ECS document) as MSG instead of the
    summary, with only the ids in the structured data: how the other
    formats travel to a syslog collector.
    """
    facts = facts or facts_of(record)
    pri = facility * 8 + syslog_severity(facts.severity)
    head = " ".join([
        f"<{pri}>1", timestamp(record.timestamp), header_field(hostname, 255), APP_NAME, NILVALUE,
        header_field(record.event_type, 32),
    ])
    sd = structured_data(record, enterprise_number, full=msg is None)
    text = _controls(facts.summary if msg is None else msg)
    return f"{head} {sd} {text if text.isascii() else BOM + text}"


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 section 4.3: MSG-LEN SP SYSLOG-MSG."""
    return b"%d %s" % (len(message), message)

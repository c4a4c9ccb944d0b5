"""Events as ArcSight Common Event Format (CEF) lines.

``CEF:0|Bulwark|PRODUCT|VERSION|event type|name|severity|extension``. In the
header a pipe and a backslash are escaped with a backslash (line breaks
cannot be escaped there and become spaces); in the extension a backslash
and an equals sign are escaped, and line breaks are written ``\\n`` and
``\\r`` (the CEF specification's rules).

Extension keys are from CEF's dictionary: ``rt`` (event time, ms), ``src``
(or ``c6a2`` for IPv6), ``spt``, ``dst``/``dhost``, ``dpt``, ``suser``
(sender), ``duser`` (recipients), ``act``, ``outcome``, ``reason``, ``msg``,
``in`` (message size), ``deviceDirection``, ``externalId`` (event id),
``cat``; and labelled custom strings for Bulwark's ids: ``cs1`` message id,
``cs2`` session id, ``cs3`` policy version, ``cs4`` Message-ID header,
``cs5`` the account or administrator, ``flexString1`` the Kafka record
(topic/partition/offset).
"""

from __future__ import annotations

import ipaddress

from .facts import PRODUCT, PRODUCT_VERSION, VENDOR, ExportRecord, Facts, facts as facts_of


def escape_header(value: str) -> str:
    value = value.replace("\\", "\\\\").replace("|", "\\|")
    return value.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def escape_extension(value: str) -> str:
    value = value.replace("\\", "\\\\").replace("=", "\\=")
    return value.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


def _is_ipv4(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address)
    except ValueError:
        return False


def extension(record: ExportRecord, hostname: str, facts: Facts) -> list[tuple[str, str]]:
    event = record.event
    pairs: list[tuple[str, object]] = [
        ("rt", int(record.timestamp.timestamp() * 1000)),
        ("dvchost", hostname),
        ("externalId", record.event_id),
        ("cat", "/".join(facts.categories) or None),
        ("act", facts.action),
        ("outcome", facts.outcome),
        ("reason", facts.reason),
    ]
    if facts.client_ip:
        if _is_ipv4(facts.client_ip):
            pairs.append(("src", facts.client_ip))
        else:
            pairs += [("c6a2", facts.client_ip), ("c6a2Label", "Source IPv6 Address")]
    pairs.append(("spt", facts.client_port))
    host = facts.destination_host
    if host:
        pairs.append(("dst" if _is_ipv4(host) else "dhost", host))
    if facts.destination_domain and facts.destination_domain != host:
        pairs.append(("dhost", facts.destination_domain))
    pairs.append(("dpt", facts.destination_port or facts.server_port))
    pairs.append(("suser", facts.sender or None))
    pairs.append(("duser", ",".join(facts.recipients) or None))
    pairs.append(("in", facts.size))
    if facts.direction in ("inbound", "outbound"):
        pairs.append(("deviceDirection", 0 if facts.direction == "inbound" else 1))
    for number, (label, value) in enumerate((
        ("messageId", event.message_id if event is not None else None),
        ("sessionId", event.session_id if event is not None else None),
        ("policyVersion", facts.policy_version),
        ("headerMessageId", facts.header_message_id),
        ("account", facts.user),
    ), start=1):
        if value is not None:
            pairs += [(f"cs{number}", value), (f"cs{number}Label", label)]
    pairs += [("flexString1", f"{record.topic}/{record.partition}/{record.offset}"),
              ("flexString1Label", "kafkaRecord"), ("msg", facts.summary)]
    return [(key, str(value)) for key, value in pairs if value is not None]


def line(record: ExportRecord, hostname: str, facts: Facts | None = None) -> str:
    facts = facts or facts_of(record)
    header = [VENDOR, PRODUCT, PRODUCT_VERSION, record.event_type, facts.name, str(facts.severity)]
    ext = " ".join(f"{key}={escape_extension(value)}" for key, value in extension(record, hostname, facts))
    return "CEF:0|" + "|".join(escape_header(h) for h in header) + "|" + ext

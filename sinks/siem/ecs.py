"""Events as Elastic Common Schema documents, one JSON object per line.

ECS fields carry what ECS has names for (``@timestamp``, ``event.*``,
``email.*``, ``source.*``, ``destination.*``, ``user.*``, ``tls.*``,
``observer.*``, ``message``); ``bulwark.*`` carries the whole event as
Bulwark published it (its type, version, ids and every field, the
authoritative record) and ``bulwark.kafka`` where it was read from.

ECS keeps SMTP itself outside ``email.*``; the envelope addresses are put
there anyway, because they are the addresses a SIEM searches mail by (the
header From is not in the events).
"""

from __future__ import annotations

import json
from datetime import datetime

from .facts import PRODUCT, PRODUCT_VERSION, VENDOR, ExportRecord, Facts, event_fields, facts as facts_of

ECS_VERSION = "8.17.0"


def timestamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tls_fields(version: str | None, cipher: str | None) -> dict:
    """ECS splits Python's "TLSv1.3" into version_protocol "tls" and version "1.3"."""
    out = {}
    if version:
        protocol, _, number = version.partition("v")
        if number:
            out["version_protocol"] = protocol.lower()
            out["version"] = number if "." in number else f"{number}.0"
        else:
            out["version"] = version
    if cipher:
        out["cipher"] = cipher
    return out


def document(record: ExportRecord, hostname: str, facts: Facts | None = None) -> dict:
    facts = facts or facts_of(record)
    event = record.event
    doc: dict = {"@timestamp": timestamp(record.timestamp), "ecs": {"version": ECS_VERSION}}
    ecs_event = {
        "kind": facts.kind,
        **({"category": list(facts.categories)} if facts.categories else {}),
        "type": list(facts.types),
        "action": record.event_type,
        "outcome": facts.outcome,
        "severity": facts.severity,
        "module": "bulwark",
        "dataset": f"bulwark.{record.topic}",
    }
    if record.event_id:
        ecs_event["id"] = record.event_id
    if facts.reason:
        ecs_event["reason"] = facts.reason
    doc["event"] = ecs_event
    doc["message"] = facts.summary
    doc["observer"] = {"vendor": VENDOR, "product": PRODUCT, "version": PRODUCT_VERSION, "type": "email-gateway",
                       "hostname": hostname}

    email: dict = {}
    if facts.sender:  # the null sender (a bounce) has no address; bulwark.* keeps the ""
        email["from"] = {"address": [facts.sender]}
    if facts.recipients:
        email["to"] = {"address": list(facts.recipients)}
    if event is not None and event.message_id:
        email["local_id"] = event.message_id
    if facts.header_message_id:
        email["message_id"] = facts.header_message_id
    if facts.direction:
        email["direction"] = facts.direction
    if facts.received_at:
        email["delivery_timestamp"] = timestamp(facts.received_at)
    if email:
        doc["email"] = email

    source = {k: v for k, v in (("ip", facts.client_ip), ("port", facts.client_port)) if v is not None}
    if source:
        doc["source"] = source
    destination = {k: v for k, v in (("address", facts.destination_host), ("domain", facts.destination_domain),
                                     ("port", facts.destination_port or facts.server_port)) if v is not None}
    if destination:
        doc["destination"] = destination
    if facts.user:
        doc["user"] = {"name": facts.user}
    tls = tls_fields(facts.tls_version, facts.tls_cipher)
    if tls:
        doc["tls"] = tls
    if facts.client_ip or facts.user:
        doc["related"] = {**({"ip": [facts.client_ip]} if facts.client_ip else {}),
                          **({"user": [facts.user]} if facts.user else {})}

    kafka = {"topic": record.topic, "partition": record.partition, "offset": record.offset, "key": record.key}
    if event is not None:
        fields = event_fields(event)
        fields.pop("event_id")  # event.id
        fields.pop("occurred_at")  # @timestamp
        doc["bulwark"] = {**fields, "kafka": kafka}
    else:
        doc["bulwark"] = {"type": record.type, "version": record.version, "kafka": kafka}
        doc["error"] = {"message": record.error}
    return doc


def line(record: ExportRecord, hostname: str, facts: Facts | None = None) -> str:
    """The document as one line of JSON (UTF-8; control characters escaped, so never a line break)."""
    return json.dumps(document(record, hostname, facts), ensure_ascii=False, separators=(",", ":"))

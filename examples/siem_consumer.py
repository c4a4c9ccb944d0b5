#!/usr/bin/env python3
"""A consumer of Bulwark's topics to copy into a SIEM pipeline: confluent-kafka and json, nothing of Bulwark's.

    pip install confluent-kafka
    python siem_consumer.py --bootstrap 127.0.0.1:9092 --group my-siem
    python siem_consumer.py --group my-siem --topic mail.verdicts --type message.verdict

    # A gateway on the secure profile: TLS, and a read-only principal of your own
    python siem_consumer.py --bootstrap kafka.example.net:9093 --group siem-soc \
        --security-protocol SASL_SSL --ca-file ca.pem --credentials-file siem.properties

It prints one JSON object per event. What it shows (docs/topics.md, "Writing a consumer"):

- Its own consumer group: every group gets every record; a restarted
  consumer carries on from its group's committed offsets.
- read_committed: records of aborted transactions (a message the gateway
  answered 451, never accepted) are never seen.
- At least once: offsets are committed after a batch is handled, so after a
  crash the last batch is handled again. Deduplicate on ``event_id`` where
  that matters.
- Type and version from the record headers, read before the value is parsed:
  filter cheaply, and skip a version newer than this code understands
  instead of guessing at it.
- Upcasting: an older version of an event is lifted, one version at a time,
  to the version this code reads. Topics are never rewritten; old records
  stay old on the wire.
- Security (docs/topics.md, "Connecting to a secured gateway"): SASL_SSL with
  SCRAM-SHA-512, the broker's certificate checked against the gateway's CA,
  and a principal that may read the audit topics and write nothing; its
  consumer groups start with its name. The password comes from a file only
  its owner can read, never from the command line (where `ps` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from confluent_kafka import Consumer, KafkaError, KafkaException

AUDIT_TOPICS = ["smtp.sessions", "mail.received", "mail.verdicts", "mail.deliveries", "quarantine.events",
                "outbreak.fingerprints", "dmarc.reports", "console.logins", "forensics.replay"]

# The record headers Bulwark sets on every event.
HEADER_TYPE = "bulwark-type"
HEADER_VERSION = "bulwark-version"

# The version of each event type whose fields this consumer reads. A newer
# version is skipped (with a warning: time to update this consumer); an older
# one is upcast. Other types are printed with the fields every event carries
# in every version: event_id, type, version, occurred_at, session_id, message_id.
UNDERSTOOD = {
    "message.received": 2,
    "message.verdict": 2,
    "delivery.attempted": 2,
    "session.refused": 2,
    "session.rcpt": 1,
    "quarantine.added": 1,
    "quarantine.released": 3,
    "quarantine.deleted": 2,
}


def received_v1_to_v2(event: dict) -> dict:
    # v1 kept the envelope flat, called the blob key "digest" and the
    # recipients "recipients", and had no direction (inbound only).
    event = dict(event)
    event["envelope"] = {
        "mail_from": event.pop("mail_from"), "rcpt_to": event.pop("recipients"), "sha256": event.pop("digest"),
        "size": event.pop("size"), "client_ip": event.pop("client_ip"), "client_helo": event.pop("client_helo", None),
        "authenticated_user": None, "tls": event.pop("tls", None), "received_at": event["occurred_at"],
    }
    return {**event, "direction": "inbound", "version": 2}


def verdict_v1_to_v2(event: dict) -> dict:
    return {**event, "authentication_results": None, "version": 2}


def attempted_v1_to_v2(event: dict) -> dict:
    # v1 had only the TLS version string, from a STARTTLS that validated nothing.
    version = event.get("tls")
    tls = {"policy": "opportunistic", "version": version, "cipher": None, "verified": False,
           "verify_error": "not validated (v1 gateway)" if version else None, "failure": None,
           "requiretls_relayed": False}
    return {**event, "tls": tls, "destination": None, "mx_host": None, "version": 2}


def refused_v1_to_v2(event: dict) -> dict:
    return {**event, "argument": None, "version": 2}


def released_v1_to_v2(event: dict) -> dict:
    # v1 releases went to the envelope's recipients (v2's "to" is for another address).
    return {**event, "to": None, "version": 2}


def released_v2_to_v3(event: dict) -> dict:
    # v3 records why; v2 kept only who.
    return {**event, "reason": None, "version": 3}


def deleted_v1_to_v2(event: dict) -> dict:
    return {**event, "reason": None, "version": 2}


# (type, version) -> the next version. Bulwark's own are in schemas/codec.py.
UPCASTERS = {
    ("message.received", 1): received_v1_to_v2,
    ("message.verdict", 1): verdict_v1_to_v2,
    ("delivery.attempted", 1): attempted_v1_to_v2,
    ("session.refused", 1): refused_v1_to_v2,
    ("quarantine.released", 1): released_v1_to_v2,
    ("quarantine.released", 2): released_v2_to_v3,
    ("quarantine.deleted", 1): deleted_v1_to_v2,
}


def upcast(event: dict) -> dict:
    while (event["type"], event["version"]) in UPCASTERS:
        event = UPCASTERS[(event["type"], event["version"])](event)
    return event


def describe(event: dict) -> str:
    """A line for a person; a real pipeline would map fields into its own schema here."""
    kind = event["type"]
    if kind == "message.received":
        envelope = event["envelope"]
        return (f"received <{envelope['mail_from']}> -> {', '.join(envelope['rcpt_to'])}, "
                f"{envelope['size']} bytes, {event['direction']}, from {envelope['client_ip']}")
    if kind == "message.verdict":
        return f"{event['action']}" + (f" because {', '.join(event['reasons'])}" if event["reasons"] else "") + \
            f" (policy {event['policy_version']})"
    if kind == "delivery.attempted":
        tls = event["tls"] or {}
        outcomes = "; ".join(f"{r['recipient']} {r['outcome']}" for r in event["recipients"])
        return f"{event['server']} over {tls.get('version') or 'cleartext'}: {outcomes}"
    if kind == "session.refused":
        return f"{event['phase']} refused {event['reply_code']}: {event['reason']}"
    if kind == "session.rcpt":
        return f"RCPT {event['recipient']} {'accepted' if event['accepted'] else 'refused: ' + str(event['reason'])}"
    if kind == "quarantine.added":
        return f"quarantined because {', '.join(event['reasons'])}"
    if kind == "quarantine.released":
        why = f": {event['reason']}" if event["reason"] else ""
        return f"released by {event['by']} to {', '.join(event['to'] or event['envelope']['rcpt_to'])}{why}"
    if kind == "quarantine.deleted":
        return f"deleted by {event['by']}" + (f": {event['reason']}" if event["reason"] else "")
    return ""


def handle(message, types: set[str] | None) -> None:
    headers = {name: value.decode() for name, value in message.headers() or []}
    kind, version = headers.get(HEADER_TYPE), int(headers.get(HEADER_VERSION, "0"))
    where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
    if kind is None:
        print(f"skipping {where}: not a Bulwark event (no {HEADER_TYPE} header)", file=sys.stderr)
        return
    if types is not None and kind not in types:
        return  # filtered on the header: the value is never parsed
    if kind in UNDERSTOOD and version > UNDERSTOOD[kind]:
        # Skipped, and committed with the batch. A pipeline that must not
        # miss it would stop here instead, and resume after an upgrade.
        print(f"skipping {kind} v{version} at {where}: this consumer understands v{UNDERSTOOD[kind]}",
              file=sys.stderr)
        return
    event = upcast(json.loads(message.value()))
    print(json.dumps({
        "topic": message.topic(), "partition": message.partition(), "offset": message.offset(),
        "key": message.key().decode() if message.key() else None,
        "type": event["type"], "version": event["version"], "event_id": event["event_id"],
        "occurred_at": event["occurred_at"], "session_id": event.get("session_id"),
        "message_id": event.get("message_id"), "what": describe(event),
    }), flush=True)


def security_config(protocol: str, ca_file: str | None, credentials_file: str | None) -> dict:
    """librdkafka settings for SASL_SSL with SCRAM-SHA-512; nothing for PLAINTEXT."""
    if protocol == "PLAINTEXT":
        return {}
    if not credentials_file:
        raise SystemExit("--security-protocol SASL_SSL needs --credentials-file")
    if os.stat(credentials_file).st_mode & 0o077:
        raise SystemExit(f"{credentials_file} is readable by others: chmod 600 it")
    values = {}
    with open(credentials_file) as lines:
        for line in lines:
            key, _, value = line.strip().partition("=")
            values[key.strip()] = value.strip()
    if not values.get("username") or not values.get("password"):
        raise SystemExit(f"{credentials_file} needs username= and password= lines")
    config = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": values["username"],
        "sasl.password": values["password"],
        "ssl.endpoint.identification.algorithm": "https",  # the broker's name must be in its certificate
    }
    if ca_file:
        config["ssl.ca.location"] = ca_file
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("BULWARK_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--group", default="siem-example", help="consumer group: one per consuming application")
    parser.add_argument("--topic", action="append", help="a topic to read, repeatable (default: the audit topics)")
    parser.add_argument("--type", action="append", help="only this event type, repeatable")
    parser.add_argument("--start", choices=["earliest", "latest"], default="earliest",
                        help="where a new group starts (a known group resumes from its commits)")
    parser.add_argument("--security-protocol", choices=["PLAINTEXT", "SASL_SSL"],
                        default=os.environ.get("BULWARK_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
                        help="SASL_SSL for a gateway on the secure profile")
    parser.add_argument("--ca-file", default=os.environ.get("BULWARK_KAFKA_CA_FILE"),
                        help="the gateway's Kafka CA certificate (PEM); default: the system's trust anchors")
    parser.add_argument("--credentials-file", default=os.environ.get("BULWARK_KAFKA_CREDENTIALS_FILE"),
                        help="username= and password= lines, mode 0600")
    args = parser.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": args.start,
        "enable.auto.commit": False,  # committed below, after the batch is handled
        "isolation.level": "read_committed",
        **security_config(args.security_protocol, args.ca_file, args.credentials_file),
    })
    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    consumer.subscribe(args.topic or AUDIT_TOPICS)
    types = set(args.type) if args.type else None
    try:
        while running:
            batch = consumer.consume(num_messages=500, timeout=1.0)
            for message in batch:
                if message.error():
                    if message.error().fatal():
                        raise KafkaException(message.error())
                    print(f"kafka: {message.error()}", file=sys.stderr)
                    continue
                handle(message, types)
            if batch:
                try:
                    consumer.commit(asynchronous=False)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError._NO_OFFSET:  # a batch of errors only: nothing to commit
                        raise
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

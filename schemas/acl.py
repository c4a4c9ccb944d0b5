"""Who may do what on Bulwark's Kafka topics, declared once: the secure profile's ACLs.

Each Bulwark component connects as its own principal (a SCRAM user named
after the component). This table says which topics each one writes (the
events it publishes), which it reads, which consumer groups and
transactional ids it uses; ``bindings`` turns it into Kafka ACLs, which
``bulwark kafka provision`` applies and docs/operations.md ("Securing
Kafka") shows. With the StandardAuthorizer nothing is allowed that is not
listed here: an ingest process cannot publish a policy, and a SIEM principal
reads the audit topics and writes nothing.

The table was derived from the code (who calls ``publish``/``record`` for
which event, who follows which topic, which topics the Faust agents
subscribe to): a component that starts reading or
writing a new topic needs a line here, or the secure profile refuses it
with TopicAuthorizationFailed, which the integration test of the secure
profile (tests/integration/test_kafka_secure.py) would show.

Pure data, no Kafka client: the unit tests and the docs read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import topics as t

#: The broker's own principal (inter-broker and controller traffic, and the
#: provisioning of credentials and ACLs): the only super user.
BROKER = "broker"

#: The Faust app id: its consumer group, and the prefix of the topics it
#: creates for its tables (``bulwark-streams-<table>-changelog``) and its
#: repartitioned streams.
STREAMS_APP_ID = "bulwark-streams"

AUDIT_TOPICS = tuple(spec for spec in t.ALL_TOPICS if spec.kind == "audit")


@dataclass(frozen=True)
class Principal:
    name: str
    #: Which process (or person) connects as it.
    who: str
    writes: tuple[t.TopicSpec, ...] = ()
    reads: tuple[t.TopicSpec, ...] = ()
    #: Consumer groups: literal names, or prefixes ending in ``*``.
    groups: tuple[str, ...] = ()
    #: Transactional ids, as prefixes ending in ``*`` or literal.
    transactional_ids: tuple[str, ...] = ()
    #: Topics (prefixes ending in ``*``) it may create, read and write: its own internal topics.
    owns_prefix: tuple[str, ...] = ()
    #: May create every declared topic and read their configuration (``bulwark topics ensure``).
    creates_topics: bool = False
    #: Reads only; the role of outside consumers.
    reader: bool = False


PRINCIPALS: tuple[Principal, ...] = (
    Principal(
        "ingest", "bulwark ingest (SMTP)",
        writes=(t.SESSIONS, t.RECEIVED, t.VERDICTS, t.ACCOUNTS, t.DOMAINS),
        reads=(t.POLICY, t.ACCOUNTS, t.ACCOUNT_STATE, t.BANS, t.HIJACK_LIMITS, t.VERDICTS, t.BACKSCATTER_KEYS,
               t.DOMAINS),
        # mail.received and message.refused in transactions (the durable log);
        # accounts and domains that a verification source vouched for.
        transactional_ids=("bulwark-ingest-*",),
    ),
    Principal(
        "streams", "bulwark streams worker (Faust)",
        writes=(t.VERDICTS, t.BANS, t.ACCOUNT_STATE, t.HIJACK_LIMITS, t.OUTBREAK_FINGERPRINTS, t.OUTBREAK_ALERTS),
        # screening.bans and accounts.state too: its agents follow what an
        # administrator lifts or re-enables (streams/screening.py, hijack.py).
        reads=(t.RECEIVED, t.SESSIONS, t.POLICY, t.OUTBREAK_FINGERPRINTS, t.OUTBREAK_ALERTS, t.BANS,
               t.ACCOUNT_STATE),
        groups=(STREAMS_APP_ID,),
        # Its tables' changelogs and repartitioned streams are its own.
        owns_prefix=(f"{STREAMS_APP_ID}-*",),
    ),
    Principal(
        "quarantine", "bulwark sinks quarantine",
        writes=(t.QUARANTINE,),
        reads=(t.VERDICTS, t.QUARANTINE, t.POLICY),
        groups=("bulwark-quarantine",),
    ),
    Principal(
        "delivery", "bulwark sinks delivery (and its daily TLS reports)",
        writes=(t.DELIVERIES, t.TLS_FALLBACKS, t.MTA_STS_POLICIES),
        reads=(t.VERDICTS, t.QUARANTINE, t.ACCOUNT_STATE, t.POLICY, t.TLS_FALLBACKS, t.MTA_STS_POLICIES,
               t.DELIVERIES, t.DOMAINS, t.BACKSCATTER_KEYS),
        groups=("bulwark-delivery",),
    ),
    Principal(
        "dmarc-reports", "bulwark sinks dmarc-reports",
        writes=(t.DMARC_REPORTS,),
        reads=(t.VERDICTS, t.QUARANTINE, t.POLICY),
        groups=("bulwark-dmarc-reports",),
    ),
    Principal(
        "console", "bulwark console (web)",
        # Quarantine releases and deletions, refused logins, unbans and
        # re-enabled accounts (the events the command line publishes).
        writes=(t.QUARANTINE, t.CONSOLE_LOGINS, t.BANS, t.ACCOUNT_STATE),
        # Tracking and the dashboard read the message topics; the policy
        # page its history; the screening and accounts pages their topics.
        reads=(t.POLICY, t.SESSIONS, t.RECEIVED, t.VERDICTS, t.DELIVERIES, t.QUARANTINE, t.BANS, t.ACCOUNT_STATE,
               t.CONSOLE_LOGINS, t.TRACE_INDEX),
    ),
    Principal(
        "trace-index", "bulwark sinks trace-index (the trace indexer)",
        writes=(t.TRACE_INDEX,),
        reads=(t.SESSIONS, t.RECEIVED, t.VERDICTS, t.DELIVERIES, t.QUARANTINE, t.TRACE_INDEX),
        groups=("bulwark-trace-index",),
    ),
    Principal(
        "unjudged", "bulwark sinks unjudged (the safety net for messages never judged)",
        # A message with no verdict in time is written to mail.received again.
        writes=(t.RECEIVED,),
        reads=(t.RECEIVED, t.VERDICTS),
        groups=("bulwark-unjudged",),
    ),
    Principal(
        "export", "bulwark sinks export (SIEM exports)",
        reads=AUDIT_TOPICS,
        groups=("bulwark-export-*",),
        reader=True,
    ),
    Principal(
        "admin", "the bulwark command line of an administrator (topics ensure, policy apply, accounts, "
                 "quarantine, screening, backscatter, trace, replay)",
        # forensics.replay: `bulwark replay --publish`.
        writes=(t.POLICY, t.ACCOUNTS, t.ACCOUNT_STATE, t.BANS, t.BACKSCATTER_KEYS, t.QUARANTINE, t.FORENSICS),
        reads=t.ALL_TOPICS,
        # `topics ensure` commits a first offset for the workers' group
        # before they start (bulwark/kafka.py, seed_group_offsets).
        groups=(STREAMS_APP_ID,),
        owns_prefix=(f"{STREAMS_APP_ID}-*",),
        creates_topics=True,
    ),
    Principal(
        "siem", "an outside SIEM consumer (examples/siem_consumer.py)",
        reads=AUDIT_TOPICS,
        groups=("siem-*",),
        reader=True,  # audit topics only: never directory.accounts (password hashes) nor the other state topics
    ),
)

BY_PRINCIPAL = {p.name: p for p in PRINCIPALS}

#: Which principal each process started by the local stack (bulwark/devstack.py)
#: connects as; None: it has no Kafka client (the demo mailbox).
COMPONENT_PRINCIPALS: dict[str, str | None] = {
    "mailbox": None,
    "ingest": "ingest",
    "streams": "streams",
    "quarantine": "quarantine",
    "delivery": "delivery",
    "dmarc-reports": "dmarc-reports",
    "console": "console",
    "export": "export",
    "trace-index": "trace-index",
    "unjudged": "unjudged",
}


@dataclass(frozen=True, order=True)
class Binding:
    """One ALLOW ACL: principal ``User:name`` may ``operation`` on the resource, from any host."""

    principal: str
    resource_type: str  # TOPIC, GROUP, TRANSACTIONAL_ID, CLUSTER
    resource_name: str
    pattern: str  # LITERAL or PREFIXED
    operation: str  # READ, WRITE, DESCRIBE_CONFIGS, CREATE


def _resource(name: str) -> tuple[str, str]:
    return (name[:-1], "PREFIXED") if name.endswith("*") else (name, "LITERAL")


def bindings(principal: Principal) -> list[Binding]:
    """The ACLs that let this principal do what the table says, and nothing else.

    READ and WRITE imply DESCRIBE in Kafka, so metadata, offsets and
    idempotent producing (KIP-679: WRITE on a topic allows it) need nothing
    more.
    """
    user = f"User:{principal.name}"
    out: set[Binding] = set()
    for spec in principal.writes:
        out.add(Binding(user, "TOPIC", spec.name, "LITERAL", "WRITE"))
    for spec in principal.reads:
        out.add(Binding(user, "TOPIC", spec.name, "LITERAL", "READ"))
    for group in principal.groups:
        name, pattern = _resource(group)
        out.add(Binding(user, "GROUP", name, pattern, "READ"))
    for txn in principal.transactional_ids:
        name, pattern = _resource(txn)
        out.add(Binding(user, "TRANSACTIONAL_ID", name, pattern, "WRITE"))
    for prefix in principal.owns_prefix:
        name, pattern = _resource(prefix)
        for op in ("CREATE", "READ", "WRITE", "DESCRIBE_CONFIGS"):
            out.add(Binding(user, "TOPIC", name, pattern, op))
    if principal.creates_topics:
        for spec in t.ALL_TOPICS:
            for op in ("CREATE", "DESCRIBE_CONFIGS"):
                out.add(Binding(user, "TOPIC", spec.name, "LITERAL", op))
    return sorted(out)


def reader(name: str, groups: str | None = None) -> Principal:
    """A read-only principal like ``siem``: another SIEM, with its own name and consumer groups.

    ``groups`` is its consumer group prefix (``NAME-`` by default), so two
    outside consumers never share, or reset, each other's offsets.
    """
    if name in BY_PRINCIPAL or name == BROKER:
        raise ValueError(f"{name} is one of Bulwark's own principals")
    return Principal(name, "an outside consumer", reads=AUDIT_TOPICS, groups=(groups or f"{name}-*",), reader=True)


def table_markdown() -> str:
    """The ownership table as docs/operations.md shows it."""
    def names(specs) -> str:
        if tuple(specs) == t.ALL_TOPICS:
            return "every topic"
        if tuple(specs) == AUDIT_TOPICS:
            return "the audit topics"
        return ", ".join(f"`{s.name}`" for s in specs) or "—"

    lines = ["| principal | who | writes | reads | groups, transactional ids, own topics |", "|---|---|---|---|---|"]
    for p in PRINCIPALS:
        extra = [f"group `{g}`" for g in p.groups] + [f"transactional id `{x}`" for x in p.transactional_ids]
        extra += [f"topics `{x}` (create, read, write)" for x in p.owns_prefix]
        if p.creates_topics:
            extra.append("creates the declared topics")
        lines.append(f"| `{p.name}` | {p.who} | {names(p.writes)} | {names(p.reads)} | {'; '.join(extra) or '—'} |")
    return "\n".join(lines)

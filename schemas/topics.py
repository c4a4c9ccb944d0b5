"""Every Kafka topic Bulwark uses, declared once.

Everything else (the producers, the Faust app, ``bulwark topics ensure``,
docs/topics.md's table) refers to these declarations.

Audit topics keep every event for ever by default: they are the record an
administrator traces and replays. State topics are compacted: the latest
value per key is the state (a ban, an account, the active policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import events as ev


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    #: The event field whose value is the record key.
    key_field: str
    kind: str  # "audit" or "state"
    partitions: int
    carries: tuple[type[ev.Event], ...]
    purpose: str
    #: Extra topic configs; retention for audit topics comes from settings.
    config: dict[str, str] = field(default_factory=dict)

    @property
    def compacted(self) -> bool:
        return self.kind == "state"

    def topic_config(self, audit_retention_ms: int) -> dict[str, str]:
        if self.compacted:
            base = {"cleanup.policy": "compact"}
        else:
            base = {"cleanup.policy": "delete", "retention.ms": str(audit_retention_ms)}
        return {**base, **self.config}


SESSIONS = TopicSpec(
    name="smtp.sessions",
    key="client IP address",
    key_field="client_ip",
    kind="audit",
    partitions=6,
    carries=(
        ev.SessionConnected,
        ev.SessionRefused,
        ev.SessionFlagged,
        ev.SessionEhlo,
        ev.SessionStartTls,
        ev.SessionAuth,
        ev.SessionMail,
        ev.SessionRcpt,
        ev.SessionRset,
        ev.SessionData,
        ev.SessionDisconnected,
    ),
    purpose="Every step of every SMTP dialogue; keyed by IP so one IP's counters live on one partition",
)

RECEIVED = TopicSpec(
    name="mail.received",
    key="message id",
    key_field="message_id",
    kind="audit",
    partitions=6,
    carries=(ev.MessageReceived,),
    purpose="Messages accepted with 250: envelope, client context and the blob store key",
)

VERDICTS = TopicSpec(
    name="mail.verdicts",
    key="message id",
    key_field="message_id",
    kind="audit",
    partitions=6,
    carries=(ev.Verdict, ev.MessageRefused),
    purpose="One verdict per message: every check result, the action and the policy version",
)

DELIVERIES = TopicSpec(
    name="mail.deliveries",
    key="message id",
    key_field="message_id",
    kind="audit",
    partitions=6,
    carries=(ev.DeliveryQueued, ev.DeliveryAttempted, ev.DeliveryBounced),
    purpose="Delivery attempts, their per-recipient outcome, retries and DSNs",
)

QUARANTINE = TopicSpec(
    name="quarantine.events",
    key="message id",
    key_field="message_id",
    kind="audit",
    partitions=6,
    carries=(ev.QuarantineAdded, ev.QuarantineReleased, ev.QuarantineDeleted),
    purpose="Quarantined messages and what administrators did with them",
)

POLICY = TopicSpec(
    name="config.policy",
    # Keyed by version, not by one "active" key: compaction then keeps every
    # version ever applied (re-applying one replaces only its own record),
    # so the policy a months-old verdict names can still be read. One
    # partition keeps them in order: the last record is the active policy.
    key="policy version (the last record is the active policy)",
    key_field="policy_version",
    kind="state",
    partitions=1,
    carries=(ev.PolicyPublished,),
    purpose="Every policy applied, with its version; the last is active and every component follows it",
)

ACCOUNTS = TopicSpec(
    name="directory.accounts",
    key="account address",
    key_field="address",
    kind="state",
    partitions=6,
    carries=(ev.AccountRecorded,),
    purpose="Accounts the gateway knows: local ones and those a verification source vouched for",
)

DOMAINS = TopicSpec(
    name="directory.domains",
    key="domain",
    key_field="domain",
    kind="state",
    partitions=1,
    carries=(ev.DomainCreated,),
    purpose="Domains made local by automatic domain creation (a default verification source vouched for them)",
)

ACCOUNT_STATE = TopicSpec(
    name="accounts.state",
    key="account address",
    key_field="address",
    kind="state",
    partitions=6,
    carries=(ev.AccountStateChanged,),
    purpose="Disabled and re-enabled accounts (Account Hijack Detection, administrators)",
)

BANS = TopicSpec(
    name="screening.bans",
    key="client IP address",
    key_field="client_ip",
    kind="state",
    partitions=6,
    carries=(ev.BanIssued, ev.BanLifted),
    purpose="Dynamic Screening bans with reason, counts, window and expiry; ingest enforces them",
)

HIJACK_LIMITS = TopicSpec(
    name="hijack.limits",
    key="account address",
    key_field="address",
    kind="state",
    partitions=6,
    carries=(ev.AccountLimitReached,),
    purpose="Account Hijack Detection: accounts at their message limit, until when; ingest answers them 452",
)

OUTBREAK_FINGERPRINTS = TopicSpec(
    name="outbreak.fingerprints",
    key="fingerprint",
    key_field="fingerprint",
    kind="audit",
    partitions=6,
    carries=(ev.OutbreakObserved,),
    purpose="Fingerprints of every received message, repartitioned so one fingerprint is counted in one place",
)

OUTBREAK_ALERTS = TopicSpec(
    name="outbreak.alerts",
    key="fingerprint",
    key_field="fingerprint",
    kind="state",
    partitions=6,
    carries=(ev.OutbreakDetected,),
    purpose="Fingerprints marked as outbreaks; later messages carrying them are quarantined",
)

BACKSCATTER_KEYS = TopicSpec(
    name="backscatter.keys",
    key="key number",
    key_field="key_number",
    kind="state",
    partitions=1,
    carries=(ev.BackscatterKeyRotated,),
    purpose="Backscatter Protection key rotations (numbers and start times; never key material)",
)

TLS_FALLBACKS = TopicSpec(
    name="delivery.tls-fallbacks",
    key="destination (host:port)",
    key_field="destination",
    kind="state",
    partitions=1,
    carries=(ev.TlsFallbackStarted,),
    purpose="Destinations whose TLS negotiation failed, delivered to without TLS until a time (shared by every "
            "delivery process)",
)

MTA_STS_POLICIES = TopicSpec(
    name="delivery.mta-sts",
    key="receiving domain",
    key_field="domain",
    kind="state",
    partitions=1,
    carries=(ev.MtaStsPolicyFetched,),
    purpose="Receiving domains' MTA-STS policies as last fetched: the cache every delivery process shares",
)

DMARC_REPORTS = TopicSpec(
    name="dmarc.reports",
    # One report's parts share a key, so they stay on one partition, in order.
    key="report (org_name!report_id; an unreadable one: message id#part)",
    key_field="report_key",
    kind="audit",
    partitions=1,
    carries=(ev.DmarcReportReceived, ev.DmarcReportUnreadable),
    purpose="DMARC aggregate reports other organisations sent about the local domains, parsed; and those that "
            "could not be read, with the reason",
)

CONSOLE_LOGINS = TopicSpec(
    name="console.logins",
    key="client IP address",
    key_field="client_ip",
    kind="audit",
    # As many as smtp.sessions: Dynamic Screening reads both on one channel,
    # so an address's failed SMTP AUTHs and console logins meet in one
    # worker's counters (co-partitioned topics need equal counts).
    partitions=6,
    carries=(ev.ConsoleLoginFailed,),
    purpose="Refused logins to the administrator's web console (the name tried and the address; never a password)",
)

TRACE_INDEX = TopicSpec(
    name="trace.index",
    # Not events: the changelog of the trace indexer's store (like a Faust
    # table's changelog), so a lost store is rebuilt from Kafka alone.
    key="index key, fields split by NUL (m ID, s ID: a message's or session's records; i IP TIME SESSION, "
        "a ACCOUNT TIME KIND ID: who and when; o TOPIC PARTITION: how far the index has read)",
    key_field="",
    kind="state",
    partitions=1,
    carries=(),
    purpose="Where every record about a message, session, client address or account is (topic, partition, "
            "offset), written by the trace indexer; `bulwark trace` reads it instead of scanning the topics",
)

FORENSICS = TopicSpec(
    name="forensics.replay",
    # One partition, keyed by replay: a replay's findings and its completion
    # stay together and in order.
    key="replay id",
    key_field="replay_id",
    kind="audit",
    partitions=1,
    carries=(ev.ReplayFinding, ev.ReplayCompleted),
    purpose="What `bulwark replay --publish` found: verdicts that differ or would change, bans and limits a "
            "candidate policy would issue or not; then the replay's figures",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    SESSIONS, RECEIVED, VERDICTS, DELIVERIES, QUARANTINE, POLICY, ACCOUNTS, DOMAINS, ACCOUNT_STATE, BANS, HIJACK_LIMITS,
    OUTBREAK_FINGERPRINTS, OUTBREAK_ALERTS, BACKSCATTER_KEYS, TLS_FALLBACKS, MTA_STS_POLICIES,
    DMARC_REPORTS, CONSOLE_LOGINS, TRACE_INDEX, FORENSICS,
)

BY_NAME = {spec.name: spec for spec in ALL_TOPICS}


def record_key(spec: TopicSpec, event: ev.Event) -> bytes:
    value = getattr(event, spec.key_field)
    if value is None or value == "":  # (0 is a key: backscatter key number 0)
        raise ValueError(f"{event.TYPE} has no {spec.key_field} to key {spec.name} by")
    return str(value).encode()


def topic_for(event_cls: type[ev.Event]) -> TopicSpec:
    for spec in ALL_TOPICS:
        if event_cls in spec.carries:
            return spec
    raise LookupError(f"{event_cls.__name__} is not carried by any declared topic")

"""What a SIEM wants to know about each event, said once for every format.

A record the exporter cannot read (not a Bulwark event, or a version newer
than this code) is still exported, as a pipeline error naming its topic,
offset, type and version, never its content: a SIEM sees the gap instead of
silently missing it, and nothing unvetted leaves the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from bulwark.trace import describe
from schemas import codec
from schemas import events as ev

VENDOR = "Bulwark"
PRODUCT = "Bulwark Email Security Gateway"

try:
    PRODUCT_VERSION = metadata.version("bulwark")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    PRODUCT_VERSION = "0"

#: Fields never exported, whatever topics an export is given. Events hold no
#: secret on the audit topics; an account's password verifier (Argon2id, on
#: directory.accounts) is the one thing a state topic holds that could be
#: attacked offline.
REDACTED = {("account.recorded", "password_hash")}
REDACTION = "[redacted]"


@dataclass(frozen=True)
class ExportRecord:
    """One Kafka record to export: where it is, and its event if it could be read."""

    topic: str
    partition: int
    offset: int
    key: str | None
    #: The record timestamp: the event's own time for every Bulwark event.
    timestamp: datetime
    event: ev.Event | None
    #: Type and version from the record headers, for records that could not be read.
    type: str | None = None
    version: str | None = None
    error: str | None = None

    @property
    def event_type(self) -> str:
        return self.event.TYPE if self.event is not None else (self.type or "unknown")

    @property
    def event_id(self) -> str | None:
        return self.event.event_id if self.event is not None else None


def read_record(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                headers: Iterable[tuple[str, bytes]] | None, timestamp_ms: int) -> ExportRecord:
    """Decode (and upcast) a record; one that cannot be read becomes an error record."""
    when = datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc)
    text_key = key.decode("utf-8", "backslashreplace") if key is not None else None
    try:
        event = codec.decode(value, headers)
    except (codec.UnknownEvent, ValueError) as exc:
        return ExportRecord(topic, partition, offset, text_key, when, None,
                            type=_header(headers, codec.HEADER_TYPE), version=_header(headers, codec.HEADER_VERSION),
                            error=str(exc))
    return ExportRecord(topic, partition, offset, text_key, event.occurred_at, event)


def _header(headers, name: str) -> str | None:
    try:
        return codec.header(headers, name)
    except UnicodeDecodeError:
        return None


def event_fields(event: ev.Event) -> dict:
    """The event as JSON-ready data, with what must not leave the gateway replaced."""
    data = event.model_dump(mode="json")
    for event_type, name in REDACTED:
        if event.TYPE == event_type and data.get(name) is not None:
            data[name] = REDACTION
    return data


@dataclass(frozen=True)
class Facts:
    """An event in the terms SIEMs share (ECS's categorisation, CEF's severity)."""

    #: A short title: CEF's Name.
    name: str
    #: One line an administrator can read (what `bulwark trace` prints).
    summary: str
    #: ECS event.kind: event, alert or pipeline_error.
    kind: str
    #: ECS event.category and event.type (their allowed values).
    categories: tuple[str, ...]
    types: tuple[str, ...]
    #: ECS event.outcome: whether what the client, sender or administrator
    #: attempted went through (a refused RCPT, a quarantined message: failure).
    outcome: str
    #: 0 (routine) to 10 (act now): CEF's scale, also ECS event.severity.
    severity: int
    reason: str | None = None
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    client_ip: str | None = None
    client_port: int | None = None
    server_port: int | None = None
    #: The account, login or administrator the event is about.
    user: str | None = None
    direction: str | None = None
    size: int | None = None
    header_message_id: str | None = None
    received_at: datetime | None = None
    #: Verdict action (deliver, quarantine, reject, redirect).
    action: str | None = None
    policy_version: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    #: A delivery's server (host and port) or a destination given as host:port.
    destination_host: str | None = None
    destination_port: int | None = None
    #: A delivery's MX (or smarthost) host name.
    destination_domain: str | None = None
    extra: dict = field(default_factory=dict)


def syslog_severity(severity: int) -> int:
    """RFC 5424 severity (0 emergency .. 7 debug) for a 0-10 severity."""
    if severity >= 8:
        return 3  # error
    if severity >= 6:
        return 4  # warning
    if severity >= 3:
        return 5  # notice
    return 6  # informational


def _accepted(accepted: bool) -> tuple[tuple[str, ...], str]:
    return (("protocol", "allowed"), "success") if accepted else (("protocol", "denied"), "failure")


def _host_port(server: str | None) -> tuple[str | None, int | None]:
    if not server:
        return None, None
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        return server, None
    return host.strip("[]"), int(port)


def _envelope(envelope: ev.Envelope) -> dict:
    return dict(sender=envelope.mail_from, recipients=tuple(envelope.rcpt_to), client_ip=envelope.client_ip,
                user=envelope.authenticated_user, size=envelope.size, tls_version=envelope.tls,
                received_at=envelope.received_at)


def _malware(verdict: ev.Verdict) -> bool:
    return any(r.outcome == "hit" and r.check in ("antivirus", "macros") for r in verdict.results)


VERDICT_SEVERITY = {"deliver": 1, "redirect": 4, "quarantine": 6, "reject": 7}


def facts(record: ExportRecord) -> Facts:
    event = record.event
    if event is None:
        what = f"{record.type or 'unknown type'} v{record.version or '?'}"
        return Facts(name="Unreadable record", kind="pipeline_error", categories=(), types=("error",),
                     outcome="unknown", severity=5, reason=record.error,
                     summary=f"{record.topic}[{record.partition}]@{record.offset}: {what} not exported: {record.error}")
    summary = describe(event)
    if summary == event.TYPE:  # a type `bulwark trace` does not describe
        summary = _summary(event)
    return _facts(event, summary)


def _facts(event: ev.Event, summary: str) -> Facts:
    common = dict(summary=summary, kind="event")
    match event:
        # -- smtp.sessions ----------------------------------------------------
        case ev.SessionConnected():
            return Facts(name="SMTP connection", categories=("network",), types=("connection", "start"),
                         outcome="success", severity=1, client_ip=event.client_ip, client_port=event.client_port,
                         server_port=event.server_port, extra={"listener": event.listener}, **common)
        case ev.SessionRefused():
            name = "SMTP connection refused" if event.phase == "connect" else "SMTP command refused"
            return Facts(name=name, categories=("network",), types=("connection", "denied"), outcome="failure",
                         severity=5, reason=event.reason, client_ip=event.client_ip,
                         policy_version=event.policy_version, **common)
        case ev.SessionFlagged():
            return Facts(name="SMTP session flagged", categories=("network", "intrusion_detection"),
                         types=("info",), outcome="unknown", severity=4, reason=event.reason,
                         client_ip=event.client_ip, **common)
        case ev.SessionEhlo():
            return Facts(name="SMTP EHLO" if event.esmtp else "SMTP HELO", categories=("network",),
                         types=("protocol",), outcome="success", severity=0, client_ip=event.client_ip, **common)
        case ev.SessionStartTls():
            ok = event.outcome == "success"
            return Facts(name="SMTP STARTTLS" if ok else "SMTP STARTTLS failed", categories=("network",),
                         types=("protocol",), outcome=event.outcome, severity=1 if ok else 4,
                         client_ip=event.client_ip, tls_version=event.tls_version, tls_cipher=event.cipher, **common)
        case ev.SessionAuth():
            ok = event.outcome == "success"
            return Facts(name="SMTP AUTH succeeded" if ok else "SMTP AUTH failed", categories=("authentication",),
                         types=("start",), outcome=event.outcome, severity=2 if ok else 5, reason=event.reason,
                         client_ip=event.client_ip, user=event.username, **common)
        case ev.SessionMail():
            types, outcome = _accepted(event.accepted)
            return Facts(name="MAIL FROM accepted" if event.accepted else "MAIL FROM refused",
                         categories=("email", "network"), types=types, outcome=outcome,
                         severity=1 if event.accepted else 5, reason=event.reason, sender=event.sender,
                         client_ip=event.client_ip, policy_version=event.policy_version, **common)
        case ev.SessionRcpt():
            types, outcome = _accepted(event.accepted)
            return Facts(name="RCPT TO accepted" if event.accepted else "RCPT TO refused",
                         categories=("email", "network"), types=types, outcome=outcome,
                         severity=1 if event.accepted else 4, reason=event.reason, recipients=(event.recipient,),
                         client_ip=event.client_ip, policy_version=event.policy_version, **common)
        case ev.SessionRset():
            return Facts(name="SMTP RSET", categories=("network",), types=("protocol",), outcome="success",
                         severity=0, client_ip=event.client_ip, **common)
        case ev.SessionData():
            types, outcome = _accepted(event.accepted)
            return Facts(name="Message accepted" if event.accepted else "Message refused at DATA",
                         categories=("email", "network"), types=types, outcome=outcome,
                         severity=1 if event.accepted else 5, reason=event.reason, size=event.size,
                         client_ip=event.client_ip, policy_version=event.policy_version, **common)
        case ev.SessionDisconnected():
            return Facts(name="SMTP disconnection", categories=("network",), types=("connection", "end"),
                         outcome="success", severity=0, client_ip=event.client_ip, **common)
        # -- mail.received, mail.verdicts -------------------------------------
        case ev.MessageReceived():
            return Facts(name="Message received", categories=("email",), types=("info",), outcome="success",
                         severity=1, direction=event.direction, header_message_id=event.header_message_id,
                         **_envelope(event.envelope), **common)
        case ev.Verdict():
            passed = event.action in ("deliver", "redirect")
            types = ("allowed",) if event.action == "deliver" else ("allowed", "change") if passed else ("denied",)
            severity = VERDICT_SEVERITY[event.action] + (1 if event.action == "deliver" and event.tags else 0)
            return Facts(name=f"Message verdict: {event.action}",
                         categories=("email", "malware") if _malware(event) else ("email",), types=types,
                         outcome="success" if passed else "failure", severity=severity,
                         reason=", ".join(event.reasons) or None, direction=event.direction, action=event.action,
                         policy_version=event.policy_version, **_envelope(event.envelope), **common)
        case ev.MessageRefused():
            return Facts(name="Message refused after DATA", categories=("email",), types=("denied",),
                         outcome="failure", severity=7, reason=", ".join(event.reasons) or None, action="reject",
                         policy_version=event.policy_version, **common)
        # -- mail.deliveries, quarantine.events -------------------------------
        case ev.DeliveryQueued():
            return Facts(name="Delivery queued", categories=("email",), types=("info",), outcome="success",
                         severity=1, recipients=tuple(event.recipients), extra={"source": event.source}, **common)
        case ev.DeliveryAttempted():
            outcomes = {r.outcome for r in event.recipients}
            host, port = _host_port(event.server)
            tls = event.tls
            return Facts(name="Delivery attempt", categories=("email", "network"), types=("connection",),
                         outcome="success" if outcomes == {"delivered"} else "failure",
                         severity=5 if "bounced" in outcomes else 3 if "deferred" in outcomes else 1,
                         recipients=tuple(r.recipient for r in event.recipients),
                         destination_host=host, destination_port=port, destination_domain=event.mx_host,
                         tls_version=tls.version if tls else None, tls_cipher=tls.cipher if tls else None, **common)
        case ev.DeliveryBounced():
            return Facts(name="Delivery given up", categories=("email",), types=("info",), outcome="failure",
                         severity=5, recipients=tuple(r.recipient for r in event.recipients), **common)
        case ev.QuarantineAdded():
            return Facts(name="Message quarantined", categories=("email",), types=("creation",), outcome="success",
                         severity=5, reason=", ".join(event.reasons) or None, policy_version=event.policy_version,
                         **_envelope(event.envelope), **common)
        case ev.QuarantineReleased():
            return Facts(name="Quarantined message released", categories=("email",), types=("change", "allowed"),
                         outcome="success", severity=5, reason=event.reason,
                         **{**_envelope(event.envelope), "user": event.by, "recipients": tuple(event.recipients)},
                         **common)
        case ev.QuarantineDeleted():
            return Facts(name="Quarantined message deleted", categories=("email",), types=("deletion",),
                         outcome="success", severity=3, user=event.by, reason=event.reason, **common)
        case ev.ConsoleLoginFailed():
            return Facts(name="Console login failed", categories=("authentication", "web"), types=("start",),
                         outcome="failure", severity=5, reason="wrong name or password", client_ip=event.client_ip,
                         user=event.login, **common)
        case ev.OutbreakObserved():
            return Facts(name="Message fingerprint", categories=("email",), types=("info",), outcome="success",
                         severity=0, sender=event.sender, client_ip=event.client_ip, **common)
        case ev.DmarcReportReceived():
            rows = event.records
            failing = sum(r.count for r in rows if r.dkim != "pass" and r.spf != "pass")
            return Facts(name="DMARC aggregate report", categories=("email",), types=("info",), outcome="success",
                         severity=4 if failing else 1, sender=event.received.mail_from,
                         client_ip=event.received.client_ip, **common)
        case ev.DmarcReportUnreadable():
            return Facts(name="DMARC report unreadable", categories=("email",), types=("error",), outcome="failure",
                         severity=3, reason=event.error, sender=event.received.mail_from,
                         client_ip=event.received.client_ip, size=event.size, **common)
        # -- state topics (exported only when an export is given them) --------
        case ev.OutbreakDetected():
            return Facts(name="Outbreak detected", categories=("email", "intrusion_detection"), types=("indicator",),
                         outcome="success", severity=8, **{**common, "kind": "alert"})
        case ev.PolicyPublished():
            return Facts(name="Policy applied", categories=("configuration",), types=("change",), outcome="success",
                         severity=5, user=event.applied_by, policy_version=event.policy_version, **common)
        case ev.AccountRecorded():
            return Facts(name="Account recorded", categories=("iam",), types=("user", "creation"), outcome="success",
                         severity=3, user=event.address, **common)
        case ev.DomainCreated():
            return Facts(name="Domain created", categories=("configuration",), types=("creation",),
                         outcome="success", severity=4, **common)
        case ev.AccountStateChanged():
            return Facts(name="Account enabled" if event.enabled else "Account disabled", categories=("iam",),
                         types=("user", "change"), outcome="success", severity=4 if event.enabled else 7,
                         reason=event.reason, user=event.address, **common)
        case ev.BanIssued():
            return Facts(name="Client banned", categories=("network", "intrusion_detection"), types=("denied", "start"),
                         outcome="success", severity=6, reason=event.reason, client_ip=event.client_ip,
                         **{**common, "kind": "alert"})
        case ev.BanLifted():
            return Facts(name="Client ban lifted", categories=("network",), types=("allowed", "end"),
                         outcome="success", severity=4, client_ip=event.client_ip, user=event.by, **common)
        case ev.AccountLimitReached():
            return Facts(name="Account at its message limit", categories=("iam", "intrusion_detection"),
                         types=("denied",), outcome="success", severity=6, user=event.address,
                         **{**common, "kind": "alert"})
        case ev.BackscatterKeyRotated():
            return Facts(name="Backscatter key rotated", categories=("configuration",), types=("change",),
                         outcome="success", severity=3, user=event.by, **common)
        case ev.TlsFallbackStarted():
            host, port = _host_port(event.destination)
            return Facts(name="TLS fallback to cleartext", categories=("network",), types=("protocol", "change"),
                         outcome="success", severity=5, reason=event.reason, destination_host=host,
                         destination_port=port, **common)
        case ev.MtaStsPolicyFetched():
            return Facts(name="MTA-STS policy fetched" if event.error is None else "MTA-STS policy unusable",
                         categories=("network",), types=("info",), outcome="success" if event.error is None
                         else "failure", severity=1 if event.error is None else 4, reason=event.error, **common)
    # A type added to Bulwark and not yet described here: still exported.
    return Facts(name=event.TYPE, categories=(), types=("info",), outcome="unknown", severity=3, **common)


def _summary(event: ev.Event) -> str:
    match event:
        case ev.SessionFlagged():
            return f"flagged at {event.phase}: {event.reason}" + (f" ({event.detail})" if event.detail else "")
        case ev.OutbreakObserved():
            return f"{event.kind} fingerprint {event.fingerprint[:16]} from <{event.sender}> ({event.client_ip})"
        case ev.OutbreakDetected():
            return (f"outbreak: {event.kind} fingerprint {event.fingerprint[:16]} from {event.distinct_senders} "
                    f"senders, {event.distinct_client_ips} addresses in {event.window_seconds}s")
        case ev.PolicyPublished():
            return f"policy {event.policy_version} applied by {event.applied_by} from {event.source}"
        case ev.AccountRecorded():
            return f"account {event.address} recorded ({event.source}) by {event.by}"
        case ev.DomainCreated():
            return f"domain {event.domain} made local ({event.source})"
        case ev.AccountStateChanged():
            return f"account {event.address} {'enabled' if event.enabled else 'disabled'} by {event.by}: {event.reason}"
        case ev.BanIssued():
            return f"{event.client_ip} banned until {event.expires_at:%Y-%m-%d %H:%M:%S}Z: {event.reason}"
        case ev.BanLifted():
            return f"ban of {event.client_ip} lifted by {event.by}"
        case ev.AccountLimitReached():
            return f"{event.address} sent {event.messages} messages (limit {event.limit}); held until {event.until:%H:%M:%S}Z"
        case ev.BackscatterKeyRotated():
            return f"backscatter key {event.key_number} in use (by {event.by})"
        case ev.TlsFallbackStarted():
            return f"{event.destination} gets cleartext until {event.until:%H:%M:%S}Z: {event.reason}"
        case ev.MtaStsPolicyFetched():
            return f"MTA-STS policy of {event.domain}: {event.mode or event.error}"
        case ev.DmarcReportReceived():
            total = sum(r.count for r in event.records)
            failing = sum(r.count for r in event.records if r.dkim != "pass" and r.spf != "pass")
            part = f" (part {event.part} of {event.parts})" if event.parts > 1 else ""
            return (f"DMARC report {event.report_id} from {event.org_name} on {event.policy_published.domain}"
                    f"{part}: {total} messages, {failing} failing DMARC, "
                    f"{event.date_begin:%Y-%m-%d %H:%M} to {event.date_end:%Y-%m-%d %H:%M}Z")
        case ev.ConsoleLoginFailed():
            return f"console login as {event.login} from {event.client_ip} refused"
        case ev.DmarcReportUnreadable():
            return f"unreadable DMARC report {event.report_key} from <{event.received.mail_from}>: {event.error}"
        case ev.ReplayFinding():
            what = event.error or f"{event.recorded or '-'} recorded, {event.replayed or '-'} replayed"
            return f"replay of {event.replay} ({event.mode}): {event.subject}: {what}"
        case ev.ReplayCompleted():
            under = f" under {event.candidate_policy}" if event.candidate_policy else ""
            return (f"replay of {event.replay}{under} by {event.by}: {event.read} records read, "
                    f"{event.selected} selected, {event.findings} findings")
    return event.TYPE

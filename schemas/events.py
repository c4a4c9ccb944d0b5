"""Every event Bulwark publishes, declared once.

Events are immutable facts. Each carries its type and schema version, the
time it happened (event time: it is also the Kafka record timestamp, so
windows and replays agree), and the correlation ids that tie it to its SMTP
session and its message. Changing the shape of an event means a new version,
an upcaster in ``schemas.codec`` and a fixture of the old form in the tests;
topics are never rewritten.

The JSON Schema files in ``schemas/json/`` are generated from these classes
(``bulwark schemas generate``) for consumers outside Python.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def new_id() -> str:
    """A 28-hex-digit id that sorts by creation time.

    Written by hand because Python 3.11 has no uuid7: 48 bits of milliseconds
    then 64 random bits, so ids of one gateway sort in the order they were made
    (handy when reading a mailbox or a log) and never collide in practice.
    """
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def wire_text(value):
    """``value`` with every string made writable as UTF-8 JSON (RFC 8259).

    aiosmtpd decodes what a client sends as UTF-8 with ``surrogateescape``, so
    a byte that is not UTF-8 (an 8-bit byte in RCPT TO, say) reaches an event
    as a lone surrogate, which no JSON encoder or consumer accepts. Such bytes
    are written as ``\\xNN`` (as Python's ``repr`` shows them), the rest of the
    text as sent: the event records what the client did, and is published.
    """
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate that stands for no byte
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [wire_text(v) for v in value]
    if isinstance(value, dict):
        return {wire_text(k): wire_text(v) for k, v in value.items()}
    return value


class EventModel(BaseModel):
    """An event or a part of one: immutable, no unknown fields, always writable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _writable(cls, value):
        return wire_text(value)


class Event(EventModel):
    """Fields common to every event."""

    #: Set by each concrete event class; they also appear as JSON fields.
    TYPE: ClassVar[str]
    VERSION: ClassVar[int]

    event_id: str = Field(default_factory=new_id, description="Unique id of this event")
    type: str = Field(description="Event type, e.g. session.connected")
    version: int = Field(description="Schema version of this event type")
    occurred_at: datetime = Field(
        default_factory=utcnow,
        description="When it happened (UTC); also the Kafka record timestamp",
    )
    session_id: str | None = Field(default=None, description="SMTP session this event belongs to")
    message_id: str | None = Field(default=None, description="Bulwark message id (the queue id)")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            # The type and version fields default to the class's own, and
            # accept nothing else: an event cannot claim to be another.
            cls.model_fields["type"].default = cls.TYPE
            cls.model_fields["version"].default = cls.VERSION
            cls.model_rebuild(force=True)

    @field_validator("occurred_at")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a time zone")
        return value.astimezone(timezone.utc)

    def model_post_init(self, __context) -> None:
        if self.type != self.TYPE or self.version != self.VERSION:
            raise ValueError(
                f"{type(self).__name__} is {self.TYPE} v{self.VERSION}, "
                f"not {self.type} v{self.version}"
            )

    @property
    def timestamp_ms(self) -> int:
        return int(self.occurred_at.timestamp() * 1000)


# --------------------------------------------------------------------------
# smtp.sessions: one event per step of the SMTP dialogue, keyed by client IP.
# --------------------------------------------------------------------------


class SessionEvent(Event):
    client_ip: str = Field(description="Address of the SMTP client")


class SessionConnected(SessionEvent):
    TYPE: ClassVar[str] = "session.connected"
    VERSION: ClassVar[int] = 1
    client_port: int
    listener: str = Field(description="Which listener accepted it (inbound, submission...)")
    server_port: int


class SessionRefused(SessionEvent):
    """The gateway refused a connection or a command outside the hooks that have their own event.

    Version 2 added ``argument``: what the client sent after the command word
    (v1 records read with none; see ``schemas.codec``).
    """

    TYPE: ClassVar[str] = "session.refused"
    VERSION: ClassVar[int] = 2
    phase: str = Field(description="Where: connect, or the command that was refused")
    reply_code: int
    reason: str
    argument: str | None = Field(
        default=None, description="The command's argument as sent; bytes that are not UTF-8 written as \\xNN")
    policy_version: str | None = Field(default=None, description="Policy in force when this was decided")


class SessionEhlo(SessionEvent):
    TYPE: ClassVar[str] = "session.ehlo"
    VERSION: ClassVar[int] = 1
    hostname: str
    esmtp: bool = Field(description="EHLO (true) or HELO (false)")


class SessionStartTls(SessionEvent):
    TYPE: ClassVar[str] = "session.starttls"
    VERSION: ClassVar[int] = 1
    outcome: Literal["success", "failure"]
    tls_version: str | None = None
    cipher: str | None = None


#: ``SessionAuth.reason`` for credentials that match no account: a wrong
#: password, or a login or password that is not UTF-8 (RFC 4616), which can
#: match none. Dynamic Screening counts these as password guesses.
AUTH_INVALID_CREDENTIALS = "invalid credentials"
AUTH_NOT_UTF8_CREDENTIALS = "invalid credentials (not UTF-8)"


class SessionAuth(SessionEvent):
    """An AUTH attempt. Never the password or any part of the exchange."""

    TYPE: ClassVar[str] = "session.auth"
    VERSION: ClassVar[int] = 1
    mechanism: str
    username: str | None = Field(default=None, description="Login name the client gave")
    outcome: Literal["success", "failure"]
    reason: str | None = None


class SessionMail(SessionEvent):
    TYPE: ClassVar[str] = "session.mail"
    VERSION: ClassVar[int] = 1
    sender: str = Field(description="MAIL FROM address; empty for the null sender")
    parameters: dict[str, str] = Field(default_factory=dict)
    accepted: bool
    reply_code: int
    reason: str | None = Field(
        default=None, description="Why it was refused; for an accepted local sender Bulwark had no account for, "
        "what let it through (the verification source that vouched for it, or why none was asked)")
    policy_version: str | None = Field(default=None, description="Policy in force when this was decided")


class RecipientVerification(EventModel):
    """What the user verification sources said about an unknown recipient."""

    result: Literal["valid", "invalid", "unavailable"]
    source: str | None = Field(description="The source whose answer decided; None when none could answer")
    cached: bool = Field(description="The answer came from the cache, no source was asked")
    latency_ms: float = Field(description="Time spent asking, in milliseconds")
    detail: str | None = Field(default=None, description="The source's reason, e.g. its SMTP reply")
    account_created: bool = False
    domain_created: bool = Field(default=False, description="The domain became local (automatic domain creation)")


class SessionRcpt(SessionEvent):
    TYPE: ClassVar[str] = "session.rcpt"
    VERSION: ClassVar[int] = 1
    recipient: str
    accepted: bool
    reply_code: int
    reason: str | None = Field(default=None, description="Why it was refused (relay, unknown user...)")
    policy_version: str | None = Field(default=None, description="Policy in force when this was decided")
    verification: RecipientVerification | None = Field(
        default=None, description="Set when user verification sources were consulted for this recipient"
    )


class SessionRset(SessionEvent):
    TYPE: ClassVar[str] = "session.rset"
    VERSION: ClassVar[int] = 1


class SessionData(SessionEvent):
    """The end of DATA: what the gateway answered and why."""

    TYPE: ClassVar[str] = "session.data"
    VERSION: ClassVar[int] = 1
    accepted: bool
    reply_code: int
    size: int
    reason: str | None = None
    policy_version: str | None = Field(default=None, description="Policy in force when this was decided")


class SessionDisconnected(SessionEvent):
    TYPE: ClassVar[str] = "session.disconnected"
    VERSION: ClassVar[int] = 1
    duration_seconds: float
    messages_accepted: int


# --------------------------------------------------------------------------
# mail.received and mail.verdicts, keyed by message id.
# --------------------------------------------------------------------------


class Envelope(EventModel):
    """What the sinks need to act on a message: a claim check on the blob store."""


    mail_from: str = Field(description="Reverse path; empty for the null sender")
    rcpt_to: list[str] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Key of the raw message in the blob store")
    size: int
    client_ip: str
    client_helo: str | None = None
    authenticated_user: str | None = None
    tls: str | None = Field(default=None, description="TLS version of the session, if any")
    received_at: datetime
    requiretls: bool = False


Direction = Literal["inbound", "outbound", "internal"]


class MessageReceived(Event):
    """A message accepted at the end of DATA: durable in the blob store and here.

    Version 2 renamed v1's ``digest`` and ``recipients`` to ``envelope.sha256``
    and ``envelope.rcpt_to`` and grouped the envelope; see ``schemas.codec``.
    """

    TYPE: ClassVar[str] = "message.received"
    VERSION: ClassVar[int] = 2
    envelope: Envelope
    direction: Direction
    header_message_id: str | None = Field(default=None, description="The Message-ID header, if any")


Outcome = Literal["pass", "hit", "fail"]


class CheckResult(EventModel):
    """A named result of one check. Checks report; the verdict decides."""


    check: str = Field(description="The check that produced it")
    name: str = Field(description="Result name, e.g. ATTACHMENT_TYPE_BLOCKED")
    outcome: Outcome = Field(description="hit: found something; pass: clean; fail: could not check")
    detail: str | None = None
    evidence: list[str] = Field(default_factory=list, description="What was found, masked where sensitive")
    version: str | None = Field(
        default=None, description="Version of what judged it (engine, signature database, rule set)"
    )


Action = Literal["deliver", "quarantine", "reject", "redirect"]


class Verdict(Event):
    """What the content stage decided for one message, and every result that led to it.

    Version 2 added ``authentication_results`` (v1 records read with none;
    see ``schemas.codec``).
    """

    TYPE: ClassVar[str] = "message.verdict"
    VERSION: ClassVar[int] = 2
    action: Action
    reasons: list[str] = Field(default_factory=list, description="Result names that decided the action")
    redirect_to: str | None = None
    results: list[CheckResult]
    policy_version: str
    envelope: Envelope
    direction: Direction
    # Added as an optional field, like those on the session events: every
    # earlier verdict still reads (with no tags).
    tags: list[str] = Field(
        default_factory=list, description="Result names whose action is 'tag': delivered marked with them"
    )
    authentication_results: str | None = Field(
        default=None,
        description="Value of the Authentication-Results header (RFC 8601) the delivery adds for the downstream: "
        "the sender authentication checks' results, the gateway's hostname as authserv-id, folded as written; "
        "null when none ran (outbound mail, or the checks off)")


class MessageRefused(Event):
    """A message whose ``reject`` verdict came in time: the client was answered 550.

    The sender keeps responsibility for it; the quarantine keeps a copy for
    forensics, marked refused.
    """

    TYPE: ClassVar[str] = "message.refused"
    VERSION: ClassVar[int] = 1
    reply_code: int
    reasons: list[str]
    policy_version: str


# --------------------------------------------------------------------------
# mail.deliveries and quarantine.events, keyed by message id.
# --------------------------------------------------------------------------


class DeliveryQueued(Event):
    TYPE: ClassVar[str] = "delivery.queued"
    VERSION: ClassVar[int] = 1
    # "notification": a message Bulwark itself writes to an administrator
    # (Account Hijack Detection). Added as a new allowed value, like the
    # optional fields added elsewhere: every earlier record still reads.
    # "tlsrpt": a daily TLS report (RFC 8460) to a receiving domain, the same way.
    source: Literal["verdict", "release", "dsn", "notification", "tlsrpt"]
    recipients: list[str]


RecipientOutcome = Literal["delivered", "deferred", "bounced"]


class RecipientResult(EventModel):
    recipient: str
    outcome: RecipientOutcome
    reply_code: int | None = None
    reply: str | None = None


#: Which outbound TLS policy applied to a connection, strongest first
#: (sinks/outbound_tls.py): REQUIRETLS (RFC 8689), MTA-STS enforce or testing
#: (RFC 8461), the policy's pinned certificate of a domain mail server, a
#: certificate that must validate (a server Bulwark sends a password to),
#: opportunistic STARTTLS (RFC 7435), cleartext because an earlier
#: negotiation with the destination failed (the guide's one-hour rule), or
#: none (STARTTLS off in the policy).
TlsPolicyName = Literal["requiretls", "mta-sts", "mta-sts-testing", "pinned", "verified", "opportunistic",
                        "cleartext-retry", "none"]


class TlsOutcome(EventModel):
    """What TLS one delivery connection had, and why."""

    policy: TlsPolicyName
    version: str | None = Field(default=None, description="TLS version negotiated; null: cleartext")
    cipher: str | None = None
    verified: bool = Field(default=False, description="The certificate chain and host name were validated")
    verify_error: str | None = Field(default=None, description="Why the certificate was not validated")
    failure: str | None = Field(
        default=None, description="RFC 8460 section 4.3 result type when the policy could not be met",
    )
    requiretls_relayed: bool = Field(default=False, description="REQUIRETLS was passed on to the next hop")


class DeliveryAttempted(Event):
    """One connection's worth of a delivery: the server, its TLS and each recipient's outcome.

    Version 2 replaced v1's ``tls`` (a version string) with a TLS outcome and
    added the destination domain and MX host, which TLS reports are keyed by.
    """

    TYPE: ClassVar[str] = "delivery.attempted"
    VERSION: ClassVar[int] = 2
    attempt: int
    server: str = Field(description="host:port tried")
    destination: str | None = Field(default=None, description="The recipients' domain (the policy domain)")
    mx_host: str | None = Field(default=None, description="Host name of the server (MX, smarthost or mail server)")
    tls: TlsOutcome | None = Field(default=None, description="Null when no connection was made")
    recipients: list[RecipientResult]
    next_attempt_at: datetime | None = Field(default=None, description="When deferred recipients are retried")


class TlsFallbackStarted(Event):
    """A TLS negotiation with a destination failed: it gets cleartext until ``until``.

    The guide's rule ("SSL negotiation failures will retry without SSL for up
    to one hour"). Never applied to REQUIRETLS or MTA-STS-enforced mail.
    """

    TYPE: ClassVar[str] = "delivery.tls_fallback"
    VERSION: ClassVar[int] = 1
    destination: str = Field(description="host:port whose TLS failed")
    until: datetime
    reason: str


class MtaStsPolicyFetched(Event):
    """A receiving domain's MTA-STS policy (RFC 8461), or why there is none usable.

    The latest per domain is the cache every delivery process shares; it is
    valid until ``expires_at`` (fetch time + max_age), and refetched sooner
    when the domain's ``_mta-sts`` TXT id changes (RFC 8461 section 5.1).
    """

    TYPE: ClassVar[str] = "delivery.mta_sts_policy"
    VERSION: ClassVar[int] = 1
    domain: str
    policy_id: str | None = Field(default=None, description="The id of the _mta-sts TXT record")
    mode: Literal["enforce", "testing", "none"] | None = Field(default=None, description="Null: no usable policy")
    mx: list[str] = Field(default_factory=list)
    max_age: int | None = None
    expires_at: datetime | None = None
    policy_text: str | None = Field(default=None, description="The policy as fetched (for TLS reports)")
    error: str | None = Field(default=None, description="Why there is no usable policy (a TLS-RPT result type)")
    detail: str | None = None


class DeliveryBounced(Event):
    """Recipients given up on; a DSN went to the sender unless it was null."""

    TYPE: ClassVar[str] = "delivery.bounced"
    VERSION: ClassVar[int] = 1
    recipients: list[RecipientResult]
    dsn_message_id: str | None = Field(default=None, description="Message id of the DSN, if one was sent")


class QuarantineAdded(Event):
    TYPE: ClassVar[str] = "quarantine.added"
    VERSION: ClassVar[int] = 1
    envelope: Envelope
    reasons: list[str]
    policy_version: str


#: A reason for a quarantine action is one line of at most this many characters.
REASON_MAX = 300
#: One line: no control character (a line break in a reason could forge a log line or a syslog record).
REASON_PATTERN = r"^[^\x00-\x1f\x7f]+$"


def audit_reason(text: str) -> str:
    """A reason as the events keep it: whitespace runs (line breaks too) made one
    space, cut to REASON_MAX; ValueError when nothing is left."""
    reason = " ".join(str(text).split())[:REASON_MAX].rstrip()
    if not reason or any(ord(c) < 0x20 or ord(c) == 0x7F for c in reason):
        raise ValueError("a reason is needed (one line of text)")
    return reason


class QuarantineReleased(Event):
    """A held message released for delivery: to its recipients, or to other addresses; who and why.

    Version 2 added ``to`` (v1 records read with none: released to the
    envelope's recipients); version 3 added ``reason`` (older records read
    with none: it was not recorded). See ``schemas.codec``.
    """

    TYPE: ClassVar[str] = "quarantine.released"
    VERSION: ClassVar[int] = 3
    envelope: Envelope
    by: str = Field(description="Who released it (an administrator, or a recipient's digest link)")
    to: list[str] | None = Field(
        default=None, min_length=1,
        description="Delivered to these addresses instead of the envelope's recipients (release to another "
                    "address); none: to the envelope's recipients")
    reason: str | None = Field(
        max_length=REASON_MAX, pattern=REASON_PATTERN,
        description="Why it was released, as whoever released it said (one line, free text); "
                    "null only in records written before version 3, which kept none")

    @property
    def recipients(self) -> list[str]:
        """Who the release delivers to."""
        return list(self.to or self.envelope.rcpt_to)


class QuarantineDeleted(Event):
    """A held message deleted: never delivered; who and why.

    Version 2 added ``reason`` (v1 records read with none; see ``schemas.codec``).
    """

    TYPE: ClassVar[str] = "quarantine.deleted"
    VERSION: ClassVar[int] = 2
    by: str = Field(description="Who deleted it")
    reason: str | None = Field(
        max_length=REASON_MAX, pattern=REASON_PATTERN,
        description="Why it was deleted, as whoever deleted it said (one line, free text); "
                    "null only in records written before version 2, which kept none")


class ConsoleLoginFailed(Event):
    """A refused login to the administrator's web console: who was tried, from where.

    Never the password, nor whether the name exists (both would help a guesser
    reading the topic).
    """

    TYPE: ClassVar[str] = "console.login_failed"
    VERSION: ClassVar[int] = 1
    login: str = Field(description="The name typed in (not necessarily an administrator)")
    client_ip: str = Field(description="The address the login came from")


# --------------------------------------------------------------------------
# State topics (compacted): the latest event per key is the state.
# --------------------------------------------------------------------------


class PolicyPublished(Event):
    """A validated policy made active by ``bulwark policy apply``."""

    TYPE: ClassVar[str] = "policy.published"
    VERSION: ClassVar[int] = 1
    policy_version: str = Field(description="Version every verdict and refusal made under it records")
    document: dict = Field(description="The validated policy, as JSON")
    source: str = Field(description="File it was applied from")
    applied_by: str


class AccountRecorded(Event):
    """An account known to the gateway: created locally or by a verification source.

    ``password_hash`` is an Argon2id verifier for local accounts (never the
    password); accounts from a verification source have none and
    authenticate against their source.
    """

    TYPE: ClassVar[str] = "account.recorded"
    VERSION: ClassVar[int] = 1
    address: str
    domain: str
    source: str = Field(description="'local', or the name of the verification source that vouched for it")
    password_hash: str | None = None
    by: str = Field(description="Who or what recorded it")


class DomainCreated(Event):
    """Automatic domain creation: a default verification source vouched for a
    recipient in a domain that was not local, so the domain is local from now on."""

    TYPE: ClassVar[str] = "domain.created"
    VERSION: ClassVar[int] = 1
    domain: str
    source: str = Field(description="The default verification source that vouched for it")
    by: str = Field(description="Who or what created it")


class AccountStateChanged(Event):
    """An account disabled or enabled (Account Hijack Detection, or an administrator)."""

    TYPE: ClassVar[str] = "account.state_changed"
    VERSION: ClassVar[int] = 1
    address: str
    enabled: bool
    reason: str
    by: str
    details: dict = Field(default_factory=dict, description="Counts, window and client addresses, when automatic")


class BanIssued(Event):
    """Dynamic Screening banned a client address until ``expires_at``."""

    TYPE: ClassVar[str] = "screening.ban_issued"
    VERSION: ClassVar[int] = 1
    client_ip: str
    reason: str
    counters: dict[str, int] = Field(default_factory=dict)
    window_start: datetime | None = None
    window_end: datetime | None = None
    expires_at: datetime


class BanLifted(Event):
    """A ban ended early (``bulwark screening unban``)."""

    TYPE: ClassVar[str] = "screening.ban_lifted"
    VERSION: ClassVar[int] = 1
    client_ip: str
    by: str


class AccountLimitReached(Event):
    """Account Hijack Detection: an account sent its limit of messages in the window.

    Until ``until`` ingest answers that account's next messages 452 (a
    temporary refusal: the sender's server retries once the window has moved
    on). When the policy disables accounts instead, the fact is an
    AccountStateChanged on accounts.state.
    """

    TYPE: ClassVar[str] = "account.limit_reached"
    VERSION: ClassVar[int] = 1
    address: str = Field(description="The account: the AUTH login, or MAIL FROM for a domain mail server session")
    messages: int = Field(description="Messages counted in the window")
    limit: int
    window_start: datetime
    window_end: datetime
    client_ips: list[str] = Field(default_factory=list, description="Client addresses the messages came from")
    until: datetime = Field(description="When ingest accepts this account's messages again")


class BackscatterKeyRotated(Event):
    """A new Backscatter Protection key number, in use from ``occurred_at``.

    Only the number and the start: the key itself is derived from a master
    secret that never leaves the gateway's hosts (bulwark/backscatter.py).
    """

    TYPE: ClassVar[str] = "backscatter.key_rotated"
    VERSION: ClassVar[int] = 1
    key_number: int = Field(ge=0, le=9)
    by: str


class SessionFlagged(SessionEvent):
    """Something suspicious noted during the dialogue but, per policy, not refused."""

    TYPE: ClassVar[str] = "session.flagged"
    VERSION: ClassVar[int] = 1
    phase: str
    reason: str
    detail: str | None = None


# --------------------------------------------------------------------------
# Outbreak Protection.
# --------------------------------------------------------------------------


class OutbreakObserved(Event):
    """One fingerprint of one received message (keyed by fingerprint for counting)."""

    TYPE: ClassVar[str] = "outbreak.observed"
    VERSION: ClassVar[int] = 1
    fingerprint: str
    kind: Literal["attachment", "body", "urls"]
    sender: str
    client_ip: str


class OutbreakDetected(Event):
    """A fingerprint seen from enough distinct senders to be an outbreak."""

    TYPE: ClassVar[str] = "outbreak.detected"
    VERSION: ClassVar[int] = 1
    fingerprint: str
    kind: Literal["attachment", "body", "urls"]
    distinct_senders: int
    distinct_client_ips: int
    window_seconds: int
    example_message_id: str


# --------------------------------------------------------------------------
# DMARC aggregate reports received for the local domains (RFC 7489 section 7.2).
# --------------------------------------------------------------------------


class DmarcPolicyPublished(EventModel):
    """The DMARC record the reporter found for the domain (``policy_published``)."""

    domain: str
    adkim: str | None = Field(default=None, description="r (relaxed) or s (strict); null when not reported")
    aspf: str | None = None
    p: str = Field(description="none, quarantine or reject")
    sp: str | None = None
    pct: int | None = None
    fo: str | None = None


class DmarcDkimResult(EventModel):
    domain: str = Field(description="The signature's d=")
    selector: str | None = None
    result: str = Field(description="none, pass, fail, policy, neutral, temperror or permerror")
    human_result: str | None = None


class DmarcSpfResult(EventModel):
    domain: str
    scope: str | None = Field(default=None, description="mfrom or helo")
    result: str = Field(description="none, neutral, pass, fail, softfail, temperror or permerror")


class DmarcReportRow(EventModel):
    """One ``record`` of a report: messages from one address that were judged alike."""

    source_ip: str
    count: int = Field(ge=0, description="Messages this row stands for")
    disposition: str = Field(description="What the reporter did: none, quarantine or reject")
    dkim: str = Field(description="DKIM aligned with the From: domain: pass or fail (policy_evaluated)")
    spf: str = Field(description="SPF aligned with the From: domain: pass or fail (policy_evaluated)")
    reasons: list[str] = Field(
        default_factory=list, description="Why the policy was not applied as published (type, then ': comment')")
    header_from: str = Field(description="The messages' From: domain")
    envelope_from: str | None = None
    envelope_to: str | None = None
    dkim_results: list[DmarcDkimResult] = Field(default_factory=list, description="Every DKIM signature checked")
    spf_results: list[DmarcSpfResult] = Field(default_factory=list)


class DmarcReportMessage(EventModel):
    """The mail a report came in: who sent it, and how its own authentication went."""

    mail_from: str
    from_header: str | None = Field(default=None, description="Its From: field")
    client_ip: str
    dmarc: str | None = Field(
        default=None, description="The message's own DMARC result on its verdict (DMARC_PASS...): whether the "
        "reporter's domain vouches for it; null when it was not judged (or came out of the quarantine)")
    attachment: str | None = Field(default=None, description="File name of the report's MIME part")
    content_type: str | None = None


class DmarcReportReceived(Event):
    """An aggregate report about one of the local domains, as the reporter wrote it.

    A report too large for one Kafka record is published in parts (``part``
    of ``parts``), each with some of its rows and the same key.
    """

    TYPE: ClassVar[str] = "dmarc.report_received"
    VERSION: ClassVar[int] = 1
    report_key: str = Field(description="org_name!report_id: the same report sent twice has the same key")
    org_name: str = Field(description="The reporting organisation")
    email: str = Field(description="Its contact address")
    extra_contact_info: str | None = None
    report_id: str
    date_begin: datetime = Field(description="Start of the period the report covers (UTC)")
    date_end: datetime
    report_errors: list[str] = Field(default_factory=list, description="Errors the reporter noted in the report")
    policy_published: DmarcPolicyPublished
    records: list[DmarcReportRow]
    part: int = Field(default=1, ge=1)
    parts: int = Field(default=1, ge=1)
    received: DmarcReportMessage


class DmarcReportUnreadable(Event):
    """Mail to a report address whose report could not be read: the reason, never a crash.

    The message itself is delivered as its verdict says.
    """

    TYPE: ClassVar[str] = "dmarc.report_unreadable"
    VERSION: ClassVar[int] = 1
    report_key: str = Field(description="MESSAGE_ID#N: the message and which of its MIME parts (0: none found)")
    error: str
    size: int | None = Field(default=None, description="Bytes of the part as received (before decompression)")
    received: DmarcReportMessage


# --------------------------------------------------------------------------
# forensics.replay: what `bulwark replay` found, when asked to --publish it.
# --------------------------------------------------------------------------


REPLAY_KINDS = Literal["verdicts", "sessions"]
REPLAY_MODES = Literal["recorded", "candidate"]


class ReplayFinding(Event):
    """One thing a replay found, for whoever reads the topic (a SIEM, a ticket).

    A verdict replay publishes one per message whose verdict differs from the
    recorded one (mode ``recorded``) or whose action would change under the
    candidate policy (mode ``candidate``), and one per message it could not
    replay; a session replay one per client address or account whose bans,
    limits or disables differ between the recorded policies and the
    candidate (or, without a candidate, one per fact the recorded policies
    issue). The replay's ``ReplayCompleted`` follows its findings.
    """

    TYPE: ClassVar[str] = "forensics.replay_finding"
    VERSION: ClassVar[int] = 1
    replay_id: str = Field(description="The replay this belongs to (its ReplayCompleted has the same)")
    replay: REPLAY_KINDS = Field(description="What was replayed: mail.verdicts, or smtp.sessions and mail.received")
    mode: REPLAY_MODES = Field(description="Under the recorded policy versions, or a candidate policy")
    subject: str = Field(description="A message id (verdicts), a client address or an account (sessions)")
    recorded: str | None = Field(default=None, description="What the recorded policy did: an action; bans and limits")
    replayed: str | None = Field(default=None, description="What the replay gave: an action; bans and limits")
    causes: list[str] = Field(default_factory=list, description="Why it differs, as the replay explains it")
    error: str | None = Field(default=None, description="Why it could not be replayed")
    details: dict = Field(default_factory=dict, description="The row as `bulwark replay --json` prints it")


class ReplayCompleted(Event):
    """A replay ended: what it selected and read, and how many findings it published before this."""

    TYPE: ClassVar[str] = "forensics.replay_completed"
    VERSION: ClassVar[int] = 1
    replay_id: str
    replay: REPLAY_KINDS
    mode: REPLAY_MODES
    candidate_policy: str | None = Field(default=None, description="The candidate's version (mode candidate)")
    selection: dict = Field(default_factory=dict, description="The selection options given, by name")
    read: int = Field(description="Records read")
    selected: int = Field(description="Messages judged again, or session events counted")
    findings: int = Field(description="ReplayFinding events published before this one")
    by: str = Field(description="Who ran it")


# Every concrete event, for the codec and the JSON Schema generator.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        SessionConnected,
        SessionRefused,
        SessionEhlo,
        SessionStartTls,
        SessionAuth,
        SessionMail,
        SessionRcpt,
        SessionRset,
        SessionData,
        SessionDisconnected,
        MessageReceived,
        Verdict,
        DeliveryQueued,
        DeliveryAttempted,
        DeliveryBounced,
        TlsFallbackStarted,
        MtaStsPolicyFetched,
        QuarantineAdded,
        QuarantineReleased,
        QuarantineDeleted,
        ConsoleLoginFailed,
        PolicyPublished,
        AccountRecorded,
        DomainCreated,
        AccountStateChanged,
        BanIssued,
        BanLifted,
        AccountLimitReached,
        OutbreakObserved,
        OutbreakDetected,
        MessageRefused,
        BackscatterKeyRotated,
        SessionFlagged,
        DmarcReportReceived,
        DmarcReportUnreadable,
        ReplayFinding,
        ReplayCompleted,
    )
}

AnyEventType = Annotated[str, Field(description="One of EVENT_TYPES")]

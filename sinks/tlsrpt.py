"""SMTP TLS Reporting (RFC 8460): a daily report of outbound TLS to each domain that asks for one.

Every delivery attempt is a ``delivery.attempted`` event with its TLS
outcome (sinks/outbound_tls.py). Once a day, after midnight UTC and a random
delay (section 4.1), the delivery process reads the previous day's attempts
from ``mail.deliveries`` and the MTA-STS policies from ``delivery.mta-sts``,
sums them per receiving domain (the Policy Domain) in the section 4 JSON
format, looks up the domain's ``_smtp._tls`` TXT record (section 3) and
queues the gzipped report to each ``mailto:`` address in its ``rua``
through the delivery sink (section 5.3). ``https:`` addresses are not built:
a domain that lists only those gets no report, and the outcome says so.

What counts (sections 4.2 and 4.3):

- a session is a connection on which TLS was, or should have been,
  negotiated with the domain's MX. An attempt that reached no server is not
  one (4.3.4: transient failures need not be reported); nor is one where
  Bulwark itself chose cleartext (STARTTLS off in the policy, or the
  cleartext retry after a failed negotiation, whose failure was counted);
- successful: TLS that met the policy in force ("policy-compliant", 4.2.1);
- failed: the outcome's result type. Under MTA-STS that is any failure to
  meet the policy (in testing mode too: that is what testing is for). With
  no policy, certificates are not validated (opportunistic TLS, RFC 7435),
  so only a server that offers no STARTTLS (``starttls-not-supported``) or a
  handshake that fails counts, plus the domain's MTA-STS policy that could
  not be fetched or was invalid (4.3.2.2).

Not reported: local domains (and those made local at run time), mail that
goes through a smarthost (the smarthost's TLS is not the recipient
domain's), and the reports' own deliveries (section 3: "SHOULD NOT include
this SMTP session in the next report").

A report is queued under a message id derived from the day and the domain,
so however often the job runs (a restart, two delivery processes a few
hours apart), the queue, and the ``delivery.queued`` events already on the
topic, make it one report per domain and day.

Reports are sent from the null sender with ``TLS-Required: No`` (RFC 8689
section 5): section 5.3 says a report MUST NOT be held back by the
domain's MTA-STS policy, since the report may be about exactly that policy
failing. Section 3 also requires a DKIM signature of the reporting domain:
the delivery sink signs the report as the last step, like the
organisation's other outbound mail (sinks/dkim_sign.py), with the keys of
``report_from``'s domain (its ``use: tlsrpt`` keys when it has any). With no
key for that domain the report goes unsigned, and receivers that follow the
RFC ignore it (docs/admin-guide.md, "TLS reports").
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote

import dns.asyncresolver
import dns.exception
import dns.resolver

from bulwark.kafka import iter_records
from bulwark.settings import Settings
from schemas import events as ev
from schemas.events import utcnow
from schemas.topics import DELIVERIES, MTA_STS_POLICIES

if TYPE_CHECKING:
    from bulwark.policy import Policy
    from sinks.delivery import DeliverySink

log = logging.getLogger(__name__)

#: Queue ids of reports start with this: their own deliveries are not reported (section 3).
REPORT_ID_PREFIX = "tlsrpt-"
SUCCESS = "success"
#: RFC 8460 section 4.3.2.2: why a domain's MTA-STS policy could not be applied.
STS_POLICY_FAILURES = frozenset({"sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"})
#: RFC 8460 section 4.3.1: certificate problems with a name of their own.
CERTIFICATE_FAILURES = frozenset({"certificate-host-mismatch", "certificate-expired", "certificate-not-trusted"})
#: A failed policy fetch is recorded just before the delivery it was made for;
#: attempts this soon after it were made without the policy because of it.
STS_FAILURE_WINDOW = timedelta(minutes=10)
#: TLS policies under which no TLS session with the domain's MX was attempted
#: (Bulwark's own choice of cleartext), or which are not the domain's at all
#: (Bulwark's own mail servers): nothing to report.
_NOT_A_SESSION = frozenset({"none", "cleartext-retry", "pinned", "verified"})
_MTA_STS = frozenset({"mta-sts", "mta-sts-testing"})
#: Section 7 ("Reports as DDoS"): a record cannot make one report go to many.
MAX_RUA = 5
#: Section 4.1's example: a random delay of up to four hours after midnight.
REPORT_DELAY_MAX_SECONDS = 4 * 3600
#: How soon a day whose reports could not all be settled (DNS, Kafka) is tried again.
RETRY_SECONDS = 3600
_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_RECORD_START = re.compile(r"^v=TLSRPTv1\s*;")


# -- what happened: sessions, per domain and policy -----------------------------


@dataclass(frozen=True)
class AppliedPolicy:
    """A policy entry of the report (section 4.4 "policy"), as applied to sessions."""

    type: str  # "sts" or "no-policy-found" ("tlsa": DANE is not built)
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


NO_POLICY = AppliedPolicy("no-policy-found")


@dataclass(frozen=True)
class FailureKey:
    result_type: str
    receiving_mx_hostname: str | None
    receiving_ip: str | None
    failure_reason_code: str | None


@dataclass
class PolicySummary:
    policy: AppliedPolicy
    successes: int = 0
    failures: Counter = field(default_factory=Counter)
    #: MX hosts the sessions went to: the "mx-host" of a no-policy-found entry.
    mx_hosts: set[str] = field(default_factory=set)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """00:00 UTC of ``day`` and of the next day (section 4.1: a full UTC day)."""
    start = datetime.combine(day, time(0), tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


def receiving_ip(server: str) -> str | None:
    """The address in ``host[address]:port`` (sinks/routing.py Route), if one is there."""
    match = re.search(r"\[([0-9A-Fa-f.:]+)\]", server)
    return match.group(1) if match else None


def policy_domain(domain: str) -> str:
    """Section 4.4: the Policy Domain in A-labels (Punycode), lower case."""
    domain = domain.lower().rstrip(".")
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def session_result(tls: ev.TlsOutcome | None) -> str | None:
    """SUCCESS, the RFC 8460 section 4.3 result type, or None when the attempt is no TLS session to report."""
    if tls is None or tls.policy in _NOT_A_SESSION:
        return None
    if tls.policy == "requiretls" and tls.version and tls.verified:
        # The domain's policy was met; a next hop that does not offer
        # REQUIRETLS fails the sender's requirement, not the domain's.
        return SUCCESS
    if tls.failure == "validation-failure" and tls.verify_error and tls.policy != "opportunistic":
        # Section 4.3.3: the catch-all only when no negotiation failure fits;
        # the certificate's own problem leads the recorded reason
        # (sinks/outbound_tls.py, e.g. "certificate-expired: ..."). Not
        # without a policy: there a validation-failure is a handshake that
        # failed even unvalidated, whatever the certificate's problem was.
        named = tls.verify_error.partition(":")[0]
        return named if named in CERTIFICATE_FAILURES else tls.failure
    if tls.failure:
        return tls.failure
    if tls.version:
        return SUCCESS
    if tls.policy == "opportunistic":
        return "starttls-not-supported"
    return "validation-failure"  # (no path records this; section 4.3.3's catch-all)


class PolicyHistory:
    """MTA-STS policies as fetched (``delivery.mta-sts``), to tell which applied when."""

    def __init__(self, fetched: Iterable[ev.MtaStsPolicyFetched] = ()):
        self._by_domain: dict[str, list[ev.MtaStsPolicyFetched]] = {}
        for event in fetched:
            self._by_domain.setdefault(event.domain.lower(), []).append(event)
        for events in self._by_domain.values():
            events.sort(key=lambda e: e.occurred_at)

    def latest(self, domain: str, when: datetime) -> ev.MtaStsPolicyFetched | None:
        found = None
        for event in self._by_domain.get(domain, []):
            if event.occurred_at > when:
                break
            found = event
        return found

    def applied(self, domain: str, when: datetime) -> ev.MtaStsPolicyFetched | None:
        """The usable policy fetched last before ``when``; else the last usable one at all
        (the topic is compacted: the fetch itself may be gone)."""
        usable = [e for e in self._by_domain.get(domain, []) if e.mode is not None]
        before = [e for e in usable if e.occurred_at <= when]
        return (before or usable or [None])[-1]


def _sts_policy(fetched: ev.MtaStsPolicyFetched | None) -> AppliedPolicy:
    if fetched is None:
        return AppliedPolicy("sts")
    # Section 4.5: the policy as the domain declared it, one string a line.
    lines = tuple(line.strip() for line in (fetched.policy_text or "").splitlines() if line.strip())
    return AppliedPolicy("sts", lines, tuple(fetched.mx))


class Aggregate:
    """One UTC day's TLS sessions, per Policy Domain and applied policy."""

    def __init__(self, day: date, policies: PolicyHistory | None = None,
                 reportable: Callable[[ev.DeliveryAttempted], bool] | None = None):
        self.day = day
        self.start, self.end = day_bounds(day)
        self.policies = policies or PolicyHistory()
        self.reportable = reportable or (lambda attempt: True)
        self.domains: dict[str, dict[AppliedPolicy, PolicySummary]] = {}

    def add(self, attempt: ev.DeliveryAttempted) -> None:
        if not (self.start <= attempt.occurred_at < self.end) or not attempt.destination:
            return
        if (attempt.message_id or "").startswith(REPORT_ID_PREFIX) or not self.reportable(attempt):
            return
        result = session_result(attempt.tls)
        if result is None:
            return
        domain = policy_domain(attempt.destination)
        tls = attempt.tls
        reason = tls.verify_error
        if tls.policy in _MTA_STS or (tls.policy == "requiretls" and
                                      self.policies.applied(domain, attempt.occurred_at) is not None):
            applied = _sts_policy(self.policies.applied(domain, attempt.occurred_at))
        else:
            applied = NO_POLICY
            latest = self.policies.latest(domain, attempt.occurred_at)
            if (tls.policy == "opportunistic" and latest is not None and latest.mode is None
                    and latest.error in STS_POLICY_FAILURES
                    and attempt.occurred_at - latest.occurred_at <= STS_FAILURE_WINDOW):
                # The domain publishes MTA-STS, but its policy could not be had,
                # so this session went without it (section 4.3.2.2).
                result, reason = latest.error, latest.detail
        summary = self.domains.setdefault(domain, {}).setdefault(applied, PolicySummary(applied))
        mx = (attempt.mx_host or "").lower().rstrip(".") or None
        if mx:
            summary.mx_hosts.add(mx)
        if result == SUCCESS:
            summary.successes += 1
        else:
            summary.failures[FailureKey(result, mx, receiving_ip(attempt.server),
                                        reason[:300] if reason else None)] += 1


def aggregate(day: date, attempts: Iterable[ev.Event], fetched: Iterable[ev.MtaStsPolicyFetched] = (),
              reportable: Callable[[ev.DeliveryAttempted], bool] | None = None) -> Aggregate:
    """The day's aggregate of these events (other event types are ignored)."""
    result = Aggregate(day, PolicyHistory(fetched), reportable)
    for event in attempts:
        if isinstance(event, ev.DeliveryAttempted):
            result.add(event)
    return result


def reportable_for(policy: "Policy", is_created: Callable[[str], bool] = lambda domain: False) \
        -> Callable[[ev.DeliveryAttempted], bool]:
    """Which attempts are reported under this policy: not to local domains (nor those
    made local at run time, ``is_created``), not through the smarthost."""
    smarthost = policy.delivery.smarthost.rpartition(":")[0].lower() if policy.delivery.smarthost else None

    def reportable(attempt: ev.DeliveryAttempted) -> bool:
        domain = (attempt.destination or "").lower().rstrip(".")
        if policy.is_local_domain(domain) or is_created(domain):
            return False
        # Section 1.1: behind a smarthost the Policy Domain would be the
        # smarthost's, whose TLS is the organisation's own affair.
        return not (smarthost and (attempt.mx_host or "").lower() == smarthost)

    return reportable


# -- the report (section 4.4) ------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def submitter_of(contact: str) -> str:
    """Section 5.3: the TLS-Report-Submitter is the domain of the contact-info address."""
    return contact.rpartition("@")[2].lower()


def report_id(day: date, domain: str, submitter: str) -> str:
    """A unique, stable id (section 4.4), in msg-id form for the subject (5.3): one per day and domain."""
    return f"{day.isoformat()}.{domain}@{submitter}"


def report_message_id(day: date, domain: str) -> str:
    """The report's queue id: the same for the same day and domain, so it is queued once."""
    return REPORT_ID_PREFIX + hashlib.sha256(f"{day.isoformat()} {domain}".encode()).hexdigest()[:24]


def _policy_entry(domain: str, summary: PolicySummary) -> dict:
    policy: dict = {"policy-type": summary.policy.type}
    if summary.policy.type == "sts":
        policy["policy-string"] = list(summary.policy.strings)
    policy["policy-domain"] = domain
    policy["mx-host"] = list(summary.policy.mx) if summary.policy.type == "sts" else sorted(summary.mx_hosts)
    details = []
    def order(key: FailureKey) -> tuple[str, ...]:
        return (key.result_type, key.receiving_mx_hostname or "", key.receiving_ip or "", key.failure_reason_code or "")

    for key, count in sorted(summary.failures.items(), key=lambda kv: order(kv[0])):
        detail = {"result-type": key.result_type}
        if key.receiving_mx_hostname:
            detail["receiving-mx-hostname"] = key.receiving_mx_hostname
        if key.receiving_ip:
            detail["receiving-ip"] = key.receiving_ip
        detail["failed-session-count"] = count
        if key.failure_reason_code:
            detail["failure-reason-code"] = key.failure_reason_code
        details.append(detail)
    return {
        "policy": policy,
        "summary": {"total-successful-session-count": summary.successes,
                    "total-failure-session-count": summary.failed},
        "failure-details": details,
    }


def report_json(day: date, domain: str, summaries: Iterable[PolicySummary], *, organization: str,
                contact: str) -> dict:
    """The aggregate report of section 4.4 for one Policy Domain and day."""
    start, end = day_bounds(day)
    order = {"sts": 0, "tlsa": 1, "no-policy-found": 2}
    return {
        "organization-name": organization,
        # Section 4.1: the full UTC day, written as the RFC's example does (end 23:59:59).
        "date-range": {"start-datetime": rfc3339(start), "end-datetime": rfc3339(end - timedelta(seconds=1))},
        "contact-info": contact,
        "report-id": report_id(day, domain, submitter_of(contact)),
        # Section 4: "policies" is an array even for one policy.
        "policies": [_policy_entry(domain, s) for s in
                     sorted(summaries, key=lambda s: (order.get(s.policy.type, 9), s.policy.strings))],
    }


def report_filename(report: dict, domain: str) -> str:
    """Section 5.1: sender!policy-domain!begin-timestamp!end-timestamp.json.gz."""
    begin = datetime.fromisoformat(report["date-range"]["start-datetime"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(report["date-range"]["end-datetime"].replace("Z", "+00:00"))
    return f"{submitter_of(report['contact-info'])}!{domain}!{int(begin.timestamp())}!{int(end.timestamp())}.json.gz"


def report_message(report: dict, domain: str, rua: list[str], now: datetime | None = None) -> bytes:
    """The report as mail (section 5.3): multipart/report, report-type tlsrpt, the gzipped JSON attached."""
    contact = report["contact-info"]
    submitter = submitter_of(contact)
    # Section 5.2: gzip. mtime 0: the same report is the same bytes.
    data = gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)
    # A boundary of the report's own (the same report is the same mail);
    # "=_" never occurs in base64 or in the text part.
    boundary = "=_tlsrpt_" + hashlib.sha256(data).hexdigest()[:32]
    message = MIMEMultipart("report", boundary=boundary, report_type="tlsrpt")
    message["From"] = contact
    message["To"] = ", ".join(rua)
    message["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    message["Date"] = format_datetime(now or utcnow())
    message["Message-ID"] = f"<{report['report-id']}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    # RFC 8689 section 5: delivered despite the domain's MTA-STS policy (RFC 8460 5.3).
    message["TLS-Required"] = "No"
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies
    totals = [p["summary"] for p in report["policies"]]
    ok = sum(t["total-successful-session-count"] for t in totals)
    failed = sum(t["total-failure-session-count"] for t in totals)
    message.attach(MIMEText(
        f"This is an aggregate TLS report from {submitter} for {domain}\n"
        f"({report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}):\n"
        f"{ok} successful and {failed} failed TLS sessions. The report (RFC 8460) is attached.\n",
        "plain", "us-ascii"))
    attachment = MIMEApplication(data, "tlsrpt+gzip")
    attachment.add_header("Content-Disposition", "attachment", filename=report_filename(report, domain))
    message.attach(attachment)
    return message.as_bytes()


# -- where a domain wants its reports (section 3) -----------------------------------


@dataclass(frozen=True)
class ReportingPolicy:
    mailto: tuple[str, ...] = ()
    https: tuple[str, ...] = ()


class RecordError(ValueError):
    """An ``_smtp._tls`` record that cannot be used."""


def select_record(texts: list[str]) -> str | None:
    """Section 3: of the TXT records (strings already joined), the one starting with
    "v=TLSRPTv1;"; none when there is none, or more than one."""
    records = [t for t in texts if _RECORD_START.match(t)]
    return records[0] if len(records) == 1 else None


def _mailto(uri: str) -> str | None:
    # RFC 6068: mailto:addr[?hfields]; commas and "!" inside a rua URI are
    # percent-encoded (section 3), so one URI names one address here.
    address = unquote(uri[len("mailto:"):].partition("?")[0]).strip()
    if not _ADDRESS.match(address):
        return None
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def parse_record(text: str) -> ReportingPolicy:
    """The rua of a "v=TLSRPTv1; rua=..." record (section 3); RecordError when it has no usable one.

    Unknown fields are ignored (section 3: parsers implement a superset).
    """
    fields: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if fields.get("v") != "TLSRPTv1":
        raise RecordError("not a v=TLSRPTv1 record")
    if not fields.get("rua"):
        raise RecordError("the record has no rua")
    mailto, https = [], []
    for uri in (u.strip() for u in fields["rua"].split(",")):
        scheme = uri.partition(":")[0].lower()
        if scheme == "mailto":
            address = _mailto(uri)
            if address and address not in mailto:
                mailto.append(address)
        elif scheme == "https":
            https.append(uri)
    if not mailto and not https:
        raise RecordError(f"no mailto: or https: address in rua={fields['rua'][:200]}")
    return ReportingPolicy(tuple(mailto[:MAX_RUA]), tuple(https[:MAX_RUA]))


@dataclass(frozen=True)
class Lookup:
    """The outcome of looking up a domain's reporting policy: never an exception."""

    outcome: str  # "found", "no-record", "invalid-record", "dns-error"
    policy: ReportingPolicy | None = None
    detail: str = ""

    @property
    def temporary(self) -> bool:
        return self.outcome == "dns-error"


async def lookup(resolver: dns.asyncresolver.Resolver, domain: str) -> Lookup:
    """The ``_smtp._tls.DOMAIN`` TXT record's rua (section 3)."""
    name = f"_smtp._tls.{domain}"
    try:
        answer = await resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Lookup("no-record", detail=f"{name} has no TXT record")
    except dns.exception.DNSException as exc:
        return Lookup("dns-error", detail=f"{name}: {type(exc).__name__}")
    # Section 3: a record's strings are joined without spaces.
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    record = select_record(texts)
    if record is None:
        found = sum(1 for t in texts if _RECORD_START.match(t))
        return Lookup("no-record", detail=f"{name} has {found} v=TLSRPTv1 records (exactly one is needed)")
    try:
        return Lookup("found", parse_record(record))
    except RecordError as exc:
        return Lookup("invalid-record", detail=f"{name}: {exc}")


# -- the daily job -------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOutcome:
    domain: str
    #: queued, already-queued, no-record, invalid-record, dns-error, https-only
    outcome: str
    detail: str = ""
    message_id: str | None = None
    rua: tuple[str, ...] = ()

    @property
    def temporary(self) -> bool:
        return self.outcome == "dns-error"


def contact_for(policy: "Policy") -> str:
    return policy.tls.tls_reporting.report_from or f"postmaster@{policy.local_domains[0]}"


async def collect(settings: Settings, day: date,
                  reportable: Callable[[ev.DeliveryAttempted], bool]) -> tuple[Aggregate, set[str]]:
    """The day's aggregate from Kafka, and the report ids already queued (by any delivery process).

    Reads ``mail.deliveries`` from the day's start only (the records carry
    their events' times), and the compacted ``delivery.mta-sts`` whole.
    """
    fetched = [r.event async for r in iter_records(settings, [MTA_STS_POLICIES.name])
               if isinstance(r.event, ev.MtaStsPolicyFetched)]
    result = Aggregate(day, PolicyHistory(fetched), reportable)
    queued: set[str] = set()
    start, _ = day_bounds(day)
    async for record in iter_records(settings, [DELIVERIES.name], since=start,
                                     types={ev.DeliveryAttempted.TYPE, ev.DeliveryQueued.TYPE}):
        event = record.event
        if isinstance(event, ev.DeliveryAttempted):
            result.add(event)
        elif isinstance(event, ev.DeliveryQueued) and (event.message_id or "").startswith(REPORT_ID_PREFIX):
            queued.add(event.message_id)
    return result, queued


async def queue_report(sink: "DeliverySink", message_id: str, raw: bytes, rua: list[str]) -> None:
    """Into the delivery queue like a DSN: from the null sender, announced, then delivered."""
    policy = sink.policy.current
    digest = await sink.blobs.put(raw)
    envelope = ev.Envelope(mail_from="", rcpt_to=rua, sha256=digest, size=len(raw), client_ip="127.0.0.1",
                           client_helo=policy.hostname, received_at=utcnow())
    sink.queue.put(message_id, sink._entry(message_id, None, "tlsrpt", envelope, rua))
    sink._unpublished.add(message_id)
    await sink._republish()


async def send_reports(settings: Settings, sink: "DeliverySink", day: date,
                       only: set[str] | None = None) -> list[ReportOutcome]:
    """Build ``day``'s reports from Kafka and queue each to its domain's mailto: rua.

    Idempotent: a report already in the queue, or announced on
    ``mail.deliveries`` by another delivery process, is not queued again.
    ``only``: just these domains (a retry of those whose lookup failed).
    """
    if not sink.policy.current.tls.tls_reporting.enabled:
        return []
    found, queued = await collect(settings, day, reportable_for(sink.policy.current, sink.created_domains.__contains__))
    return await queue_reports(sink, found, queued, only)


async def queue_reports(sink: "DeliverySink", found: Aggregate, queued: set[str] = frozenset(),
                        only: set[str] | None = None) -> list[ReportOutcome]:
    """Queue each domain's report of ``found`` to its mailto: rua; one outcome per domain (DNS problems included)."""
    policy = sink.policy.current
    contact = contact_for(policy)
    outcomes = []
    for domain in sorted(found.domains):
        if only is not None and domain not in only:
            continue
        message_id = report_message_id(found.day, domain)
        if message_id in sink.queue or message_id in queued:
            outcomes.append(ReportOutcome(domain, "already-queued", message_id=message_id))
            continue
        where = await lookup(sink.resolver, domain)
        if where.policy is None:
            outcomes.append(ReportOutcome(domain, where.outcome, where.detail))
            continue
        if not where.policy.mailto:
            outcomes.append(ReportOutcome(domain, "https-only", "https: reporting is not built: "
                                          + ", ".join(where.policy.https)))
            continue
        report = report_json(found.day, domain, found.domains[domain].values(), organization=policy.hostname,
                             contact=contact)
        rua = list(where.policy.mailto)
        await queue_report(sink, message_id, report_message(report, domain, rua), rua)
        outcomes.append(ReportOutcome(domain, "queued", message_id=message_id, rua=tuple(rua)))
    for outcome in outcomes:
        level = logging.WARNING if outcome.outcome in ("dns-error", "invalid-record") else logging.INFO
        log.log(level, "TLS report for %s (%s): %s %s", outcome.domain, found.day, outcome.outcome,
                ", ".join(outcome.rua) or outcome.detail)
    return outcomes


async def reporter(settings: Settings, sink: "DeliverySink", delay_max: float = REPORT_DELAY_MAX_SECONDS) -> None:
    """The daily job of the delivery process: yesterday's reports, after a random delay.

    Also at start-up, so a process that was down at midnight still reports;
    running again queues nothing twice. A failure (Kafka unreachable, a DNS
    lookup that timed out) is logged and retried hourly until the day after
    the reported one ends; it never stops deliveries.
    """
    day = utcnow().date() - timedelta(days=1)
    while True:
        # The day after ``day`` has begun (by the wall clock, whatever the
        # timers did), then the random delay of section 4.1.
        begun = datetime.combine(day + timedelta(days=1), time(0), tzinfo=timezone.utc)
        while (wait := (begun - utcnow()).total_seconds()) > 0:
            await asyncio.sleep(wait)
        await asyncio.sleep(random.uniform(min(1.0, delay_max), delay_max))
        pending: set[str] | None = None  # None: every domain; else those to retry
        while True:
            try:
                outcomes = await send_reports(settings, sink, day, only=pending)
            except Exception as exc:
                log.warning("TLS reports for %s not sent yet (%s: %s)", day, type(exc).__name__, exc)
            else:
                pending = {o.domain for o in outcomes if o.temporary}
                if not pending:
                    break
            if utcnow().date() > day + timedelta(days=1):
                log.warning("TLS reports for %s given up: %s", day, ", ".join(sorted(pending or ())) or "all")
                break
            await asyncio.sleep(RETRY_SECONDS)
        # The next day; never one older than yesterday (after a long outage).
        day = max(day + timedelta(days=1), utcnow().date() - timedelta(days=1))


# -- `bulwark tlsrpt show` -----------------------------------------------------------


async def so_far(settings: Settings, policy: "Policy", day: date) -> Aggregate:
    """The day's aggregate as the report will have it (for today: up to now)."""
    from bulwark.created_domains import CreatedDomains

    created = CreatedDomains(settings)
    await created.start()
    try:
        found, _ = await collect(settings, day, reportable_for(policy, created.__contains__))
    finally:
        await created.stop()
    return found


def reports(found: Aggregate, policy: "Policy") -> list[dict]:
    """Each domain's report (section 4.4) as it would be sent."""
    return [report_json(found.day, domain, found.domains[domain].values(), organization=policy.hostname,
                        contact=contact_for(policy)) for domain in sorted(found.domains)]


def render(found: Aggregate) -> str:
    """A table per domain: successes and failures by result type."""
    lines = []
    for domain in sorted(found.domains):
        summaries = found.domains[domain].values()
        ok = sum(s.successes for s in summaries)
        failed = sum(s.failed for s in summaries)
        lines.append(f"{domain}: {ok} successful, {failed} failed")
        for summary in sorted(summaries, key=lambda s: (s.policy.type, s.policy.strings)):
            what = summary.policy.type
            if summary.policy.type == "sts":
                mode = next((s.partition(":")[2].strip() for s in summary.policy.strings if s.startswith("mode:")), "?")
                what += f" ({mode}; mx {', '.join(summary.policy.mx) or '?'})"
            lines.append(f"  policy {what:50} successful {summary.successes:>6}  failed {summary.failed:>6}")
            for key, count in sorted(summary.failures.items(), key=lambda kv: (-kv[1], kv[0].result_type)):
                where = key.receiving_mx_hostname or "?"
                if key.receiving_ip:
                    where += f" [{key.receiving_ip}]"
                reason = f"  {key.failure_reason_code}" if key.failure_reason_code else ""
                lines.append(f"    {key.result_type:27} {count:>6}  {where}{reason}")
    return "\n".join(lines)

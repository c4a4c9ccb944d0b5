"""SMTP TLS Reporting (RFC 8460): what is counted, the report's JSON and mail, the TXT record, and delivery.

The first parts are pure (hand-built events). The last drives the report
through the delivery sink to a real receiver: NSD serves the ``_smtp._tls``
records and the receiving domain's MTA-STS record, an aiosmtpd server with an
untrusted certificate receives, an HTTPS host publishes an MTA-STS policy
in enforce mode that the report must not be held back by (section 5.3).
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import date, datetime, timedelta, timezone
from email import message_from_bytes
from email.policy import default as default_policy

import jsonschema
import pytest

from bulwark.policy import Policy
from bulwark.settings import Settings
from schemas import events as ev
from sinks import tlsrpt
from sinks.delivery import DeliverySink
from sinks.store import JsonIndex
from tests.dkim_keys import TestKeys, nsd_dnsfunc, signatures, verify_all
from tests.outbound_servers import Authority, Nsd, PolicyHost, Receiver, Recorder, deliver_and_publish, free_port

DAY = date(2026, 11, 30)
NOON = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
STS_TEXT = "version: STSv1\r\nmode: testing\r\nmx: mx1.partner.example\r\nmx: *.backup.partner.example\r\nmax_age: 86400\r\n"


def policy(**changes) -> Policy:
    document = {"hostname": "gw.example.test", "local_domains": ["example.test"],
                "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}]}
    document.update(changes)
    return Policy.model_validate(document)


def attempt(domain: str = "partner.example", mx: str = "mx1.partner.example", at: datetime = NOON,
            message_id: str = "m1", ip: str | None = "192.0.2.7", **tls) -> ev.DeliveryAttempted:
    outcome = ev.TlsOutcome(**tls) if tls else None
    server = f"{mx}[{ip}]:25" if ip else f"{mx}:25"
    return ev.DeliveryAttempted(message_id=message_id, attempt=1, server=server, destination=domain, mx_host=mx,
                                tls=outcome, occurred_at=at,
                                recipients=[ev.RecipientResult(recipient=f"x@{domain}", outcome="delivered")])


def sts_fetched(domain: str = "partner.example", at: datetime = NOON - timedelta(hours=3), text: str = STS_TEXT,
                **changes) -> ev.MtaStsPolicyFetched:
    fields = dict(domain=domain, policy_id="20261130", mode="testing",
                  mx=["mx1.partner.example", "*.backup.partner.example"], max_age=86400,
                  expires_at=at + timedelta(days=1), policy_text=text, occurred_at=at)
    fields.update(changes)
    return ev.MtaStsPolicyFetched(**fields)


OK = dict(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=True)


# -- what is a session, and how it ended (sections 4.2, 4.3) -------------------------


@pytest.mark.parametrize("tls, expected", [
    (None, None),                                                      # no connection: 4.3.4, not reported
    (dict(policy="opportunistic", **OK), tlsrpt.SUCCESS),
    (dict(policy="opportunistic", version="TLSv1.2", verified=False,   # no policy asks for validation
          verify_error="certificate-not-trusted: self-signed certificate"), tlsrpt.SUCCESS),
    (dict(policy="opportunistic"), "starttls-not-supported"),          # cleartext: no STARTTLS offered
    (dict(policy="opportunistic", failure="validation-failure",
          verify_error="TLS negotiation failed: EOF"), "validation-failure"),
    (dict(policy="opportunistic", failure="validation-failure",      # the unvalidated retry failed too
          verify_error="certificate-not-trusted: self-signed certificate"), "validation-failure"),
    (dict(policy="mta-sts", **OK), tlsrpt.SUCCESS),
    (dict(policy="mta-sts", failure="certificate-expired"), "certificate-expired"),
    (dict(policy="mta-sts-testing", version="TLSv1.3", failure="certificate-host-mismatch"),
     "certificate-host-mismatch"),                                     # delivered, and reported
    (dict(policy="mta-sts-testing", version="TLSv1.3", failure="validation-failure",   # the certificate's
          verify_error="certificate-expired: certificate has expired"), "certificate-expired"),  # own problem
    (dict(policy="mta-sts-testing", version="TLSv1.3", failure="validation-failure",
          verify_error="validation-failure: unsupported certificate purpose"), "validation-failure"),
    (dict(policy="requiretls", **OK, failure="starttls-not-supported",
          verify_error="the next hop does not offer REQUIRETLS"), tlsrpt.SUCCESS),
    (dict(policy="requiretls", failure="certificate-not-trusted"), "certificate-not-trusted"),
    (dict(policy="cleartext-retry"), None),                            # Bulwark's own choice
    (dict(policy="none"), None),                                       # STARTTLS off in the policy
    (dict(policy="verified", **OK), None),                             # Bulwark's own mail servers
])
def test_each_outcome_is_a_success_a_result_type_or_no_session(tls, expected):
    assert tlsrpt.session_result(ev.TlsOutcome(**tls) if tls else None) == expected


def test_sessions_are_summed_per_domain_and_applied_policy():
    events = [
        attempt(policy="mta-sts-testing", **OK),
        attempt(policy="mta-sts-testing", **OK, at=NOON + timedelta(hours=1)),
        attempt(policy="mta-sts-testing", version="TLSv1.2", failure="certificate-host-mismatch",
                verify_error="MX not in policy", mx="mx9.partner.example", ip="192.0.2.9"),
        attempt(policy="mta-sts-testing", version="TLSv1.2", failure="certificate-host-mismatch",
                verify_error="MX not in policy", mx="mx9.partner.example", ip="192.0.2.9"),
        attempt(policy="opportunistic", **OK, message_id="m2"),              # TLS-Required: No
        attempt(domain="plain.example", mx="mx.plain.example", policy="opportunistic"),
        attempt(domain="plain.example", mx="mx.plain.example", policy="opportunistic", **OK),
        attempt(domain="plain.example", mx="mx.plain.example"),              # not reached: no session
    ]
    found = tlsrpt.aggregate(DAY, events, [sts_fetched()])
    assert set(found.domains) == {"partner.example", "plain.example"}

    sts = found.domains["partner.example"][tlsrpt._sts_policy(sts_fetched())]
    assert (sts.successes, sts.failed) == (2, 2)
    assert sts.policy.strings == ("version: STSv1", "mode: testing", "mx: mx1.partner.example",
                                  "mx: *.backup.partner.example", "max_age: 86400")
    assert dict(sts.failures) == {tlsrpt.FailureKey("certificate-host-mismatch", "mx9.partner.example",
                                                    "192.0.2.9", "MX not in policy"): 2}
    none = found.domains["partner.example"][tlsrpt.NO_POLICY]
    assert (none.successes, none.failed) == (1, 0)

    plain = found.domains["plain.example"][tlsrpt.NO_POLICY]
    assert (plain.successes, plain.failed) == (1, 1)
    assert list(plain.failures) == [tlsrpt.FailureKey("starttls-not-supported", "mx.plain.example",
                                                      "192.0.2.7", None)]


def test_only_the_day_counts_and_not_what_is_not_reported():
    report_own = tlsrpt.report_message_id(DAY - timedelta(days=1), "partner.example")
    events = [
        attempt(policy="opportunistic", **OK, at=datetime(2026, 11, 29, 23, 59, 59, tzinfo=timezone.utc)),
        attempt(policy="opportunistic", **OK, at=datetime(2026, 12, 1, 0, 0, 0, tzinfo=timezone.utc)),
        attempt(policy="opportunistic", **OK, at=datetime(2026, 11, 30, 0, 0, 0, tzinfo=timezone.utc)),
        # Section 3: the report's own delivery is not in the next report.
        attempt(policy="opportunistic", failure="validation-failure", message_id=report_own),
        attempt(domain="example.test", mx="mail.example.test", policy="opportunistic", **OK),  # local domain
        attempt(domain="created.test", mx="mx.created.test", policy="opportunistic", **OK),    # made local
        attempt(domain="far.example", mx="relay.isp.example", policy="opportunistic", **OK),   # smarthost
    ]
    reportable = tlsrpt.reportable_for(policy(delivery={"smarthost": "relay.isp.example:587"}),
                                       {"created.test"}.__contains__)
    found = tlsrpt.aggregate(DAY, events, reportable=reportable)
    assert list(found.domains) == ["partner.example"]
    assert found.domains["partner.example"][tlsrpt.NO_POLICY].successes == 1


def test_an_mta_sts_policy_that_could_not_be_had_is_a_policy_failure():
    fetch_failed = sts_fetched(at=NOON - timedelta(seconds=5), mode=None, mx=[], policy_text=None,
                               error="sts-policy-fetch-error",
                               detail="https://mta-sts.partner.example/.well-known/mta-sts.txt answered HTTP 404")
    events = [
        attempt(policy="opportunistic", **OK),                                     # just after the failed fetch
        attempt(policy="opportunistic", **OK, at=NOON + timedelta(hours=2)),      # hours later: unrelated
    ]
    found = tlsrpt.aggregate(DAY, events, [fetch_failed])
    summary = found.domains["partner.example"][tlsrpt.NO_POLICY]
    assert summary.successes == 1
    [(key, count)] = summary.failures.items()
    assert (key.result_type, count) == ("sts-policy-fetch-error", 1)
    assert "HTTP 404" in key.failure_reason_code


def test_the_policy_in_force_at_the_time_is_the_one_reported():
    old = sts_fetched(at=NOON - timedelta(days=3), text=STS_TEXT.replace("testing", "enforce"), mode="enforce")
    new = sts_fetched(at=NOON + timedelta(hours=1))
    events = [attempt(policy="mta-sts", **OK), attempt(policy="mta-sts-testing", **OK, at=NOON + timedelta(hours=2))]
    found = tlsrpt.aggregate(DAY, events, [new, old])
    modes = sorted(s for p in found.domains["partner.example"] for s in p.strings if s.startswith("mode:"))
    assert modes == ["mode: enforce", "mode: testing"]


# -- the report (section 4.4) ----------------------------------------------------------

RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "tlsa-invalid",
                "dnssec-invalid", "dane-required", "certificate-not-trusted", "sts-policy-invalid",
                "sts-webpki-invalid", "validation-failure", "sts-policy-fetch-error"]  # section 6.6
DATE_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"  # RFC 3339 5.6
#: RFC 8460 section 4.4's report format, written as a JSON Schema.
REPORT_SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {"type": "object", "required": ["start-datetime", "end-datetime"], "properties": {
            "start-datetime": {"type": "string", "pattern": DATE_TIME},
            "end-datetime": {"type": "string", "pattern": DATE_TIME}}},
        "contact-info": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"], "properties": {
                "policy": {"type": "object", "required": ["policy-type", "policy-domain"], "properties": {
                    "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                    "policy-string": {"type": "array", "items": {"type": "string"}},
                    "policy-domain": {"type": "string", "pattern": r"^[a-z0-9.-]+$"},
                    "mx-host": {"type": "array", "items": {"type": "string"}}}},
                "summary": {"type": "object",
                            "required": ["total-successful-session-count", "total-failure-session-count"],
                            "properties": {"total-successful-session-count": {"type": "integer", "minimum": 0},
                                           "total-failure-session-count": {"type": "integer", "minimum": 0}}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "additionalProperties": False, "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": {"type": "string"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string"},
                        "failed-session-count": {"type": "integer", "minimum": 1},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}}}}}}},
    },
}


def sample_report() -> dict:
    events = [attempt(policy="mta-sts-testing", **OK),
              attempt(policy="mta-sts-testing", version="TLSv1.2", failure="certificate-expired",
                      verify_error="certificate-expired: certificate has expired"),
              attempt(policy="opportunistic")]
    found = tlsrpt.aggregate(DAY, events, [sts_fetched()])
    return tlsrpt.report_json(DAY, "partner.example", found.domains["partner.example"].values(),
                              organization="gw.example.test", contact="tlsrpt@example.test")


def test_the_report_has_the_shape_of_section_4_4():
    report = sample_report()
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["date-range"] == {"start-datetime": "2026-11-30T00:00:00Z", "end-datetime": "2026-11-30T23:59:59Z"}
    assert report["organization-name"] == "gw.example.test" and report["contact-info"] == "tlsrpt@example.test"
    sts, none = report["policies"]
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: testing", "mx: mx1.partner.example",
                          "mx: *.backup.partner.example", "max_age: 86400"],
        "policy-domain": "partner.example",
        "mx-host": ["mx1.partner.example", "*.backup.partner.example"],
    }
    assert sts["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert sts["failure-details"] == [{
        "result-type": "certificate-expired", "receiving-mx-hostname": "mx1.partner.example",
        "receiving-ip": "192.0.2.7", "failed-session-count": 1,
        "failure-reason-code": "certificate-expired: certificate has expired"}]
    assert none["policy"] == {"policy-type": "no-policy-found", "policy-domain": "partner.example",
                              "mx-host": ["mx1.partner.example"]}
    assert none["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    # The same day and domain give the same report id, so a receiver can drop duplicates (5.3).
    assert sample_report()["report-id"] == report["report-id"] == "2026-11-30.partner.example@example.test"


def test_an_internationalized_policy_domain_is_written_in_a_labels():
    found = tlsrpt.aggregate(DAY, [attempt(domain="bücher.example", mx="mx.xn--bcher-kva.example",
                                           policy="opportunistic", **OK)])
    assert list(found.domains) == ["xn--bcher-kva.example"]


# -- the mail (section 5.3) ----------------------------------------------------------------


def test_the_mail_is_a_multipart_report_with_the_gzipped_json():
    report = sample_report()
    raw = tlsrpt.report_message(report, "partner.example", ["a@reports.example", "b@reports.example"],
                                now=datetime(2026, 12, 1, 2, 3, 4, tzinfo=timezone.utc))
    message = message_from_bytes(raw, policy=default_policy)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "partner.example"
    assert message["TLS-Report-Submitter"] == "example.test"  # the contact-info's domain (5.3)
    assert message["From"] == "tlsrpt@example.test" and message["To"] == "a@reports.example, b@reports.example"
    subject = re.sub(r"\s+", " ", str(message["Subject"]))
    assert subject == "Report Domain: partner.example Submitter: example.test " \
                      "Report-ID: <2026-11-30.partner.example@example.test>"
    assert message["Message-ID"] == "<2026-11-30.partner.example@example.test>"
    assert message["TLS-Required"] == "No"  # RFC 8689 5: not held back by the domain's MTA-STS (8460 5.3)
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain" and "partner.example" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    # Section 5.1: sender!policy-domain!begin!end.json.gz, the day's UTC bounds.
    assert attachment.get_filename() == "example.test!partner.example!1795996800!1796083199.json.gz"
    assert json.loads(gzip.decompress(attachment.get_content())) == report


def test_the_same_report_is_the_same_mail_and_queue_id():
    report = sample_report()
    now = datetime(2026, 12, 1, 2, 3, 4, tzinfo=timezone.utc)
    assert tlsrpt.report_message(report, "partner.example", ["a@r.example"], now) == \
        tlsrpt.report_message(report, "partner.example", ["a@r.example"], now)
    assert tlsrpt.report_message_id(DAY, "partner.example") == tlsrpt.report_message_id(DAY, "partner.example")
    assert tlsrpt.report_message_id(DAY, "partner.example") != tlsrpt.report_message_id(DAY, "other.example")
    assert tlsrpt.report_message_id(DAY, "partner.example") != \
        tlsrpt.report_message_id(DAY + timedelta(days=1), "partner.example")


# -- the _smtp._tls record (section 3) ------------------------------------------------------


@pytest.mark.parametrize("texts, chosen", [
    (["v=TLSRPTv1; rua=mailto:r@example.com"], "v=TLSRPTv1; rua=mailto:r@example.com"),
    (["v=spf1 -all", "v=TLSRPTv1;rua=mailto:r@example.com"], "v=TLSRPTv1;rua=mailto:r@example.com"),
    (["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"], None),  # two: none
    (["v=TLSRPTv2; rua=mailto:r@example.com"], None),
    (["rua=mailto:r@example.com; v=TLSRPTv1"], None),  # must begin with the version
    ([], None),
])
def test_exactly_one_record_is_used(texts, chosen):
    assert tlsrpt.select_record(texts) == chosen


@pytest.mark.parametrize("text, mailto, https", [
    ("v=TLSRPTv1;rua=mailto:reports@example.com", ("reports@example.com",), ()),
    ("v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt", (), ("https://reporting.example.com/v1/tlsrpt",)),
    ("v=TLSRPTv1; rua=mailto:a@Example.COM , https://r.example/x,mailto:b%2Bx@example.com?subject=tls; ext=1;",
     ("a@example.com", "b+x@example.com"), ("https://r.example/x",)),
    ("v=TLSRPTv1; rua=mailto:a@example.com,mailto:a@example.com", ("a@example.com",), ()),
    ("v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@example.com" for i in range(9)),
     tuple(f"r{i}@example.com" for i in range(tlsrpt.MAX_RUA)), ()),  # section 7: no amplification
])
def test_the_rua_is_read(text, mailto, https):
    assert tlsrpt.parse_record(text) == tlsrpt.ReportingPolicy(mailto, https)


@pytest.mark.parametrize("text", [
    "v=TLSRPTv1",
    "v=TLSRPTv1; rua=",
    "v=TLSRPTv1; rua=ftp://example.com/x",
    "v=TLSRPTv1; rua=mailto:not an address",
    "v=TLSRPTv1; rua=mailto:a@example.com%0d%0aBcc:%20x@evil.example",  # no header injection
])
def test_a_record_without_a_usable_rua_is_an_error(text):
    with pytest.raises(tlsrpt.RecordError):
        tlsrpt.parse_record(text)


# -- through the delivery sink to a real receiver ----------------------------------------------

ZONE = "rpt.test"


class World:
    def __init__(self, tmp):
        self.ca = Authority(tmp / "ca")
        stranger = Authority(tmp / "stranger", "Some other CA")
        records = [
            # The reports' receiving domain enforces MTA-STS, and its MX's
            # certificate is not trusted: a report about exactly that must still go.
            "sts MX 10 mx.sts", "mx.sts A 127.0.2.1", '_mta-sts.sts TXT "v=STSv1; id=1"', "mta-sts.sts A 127.0.2.9",
            # Section 3: the strings of one record are joined without spaces.
            '_smtp._tls.sts TXT "v=TLSRPTv1;" "rua=mailto:tls-reports@sts.rpt.test"',
            '_smtp._tls.multi TXT "v=TLSRPTv1; rua=mailto:a@sts.rpt.test,mailto:b@sts.rpt.test"',
            '_smtp._tls.two TXT "v=TLSRPTv1; rua=mailto:a@sts.rpt.test"',
            '_smtp._tls.two TXT "v=TLSRPTv1; rua=mailto:b@sts.rpt.test"',
            '_smtp._tls.bad TXT "v=TLSRPTv1; rua=ftp://sts.rpt.test/"',
            '_smtp._tls.web TXT "v=TLSRPTv1; rua=https://reports.sts.rpt.test/tlsrpt"',
            "none A 127.0.2.2",
        ]
        self.nsd = Nsd(tmp / "nsd", {ZONE: records}).start()
        self.port = free_port("127.0.2.1")
        self.receiver = Receiver("127.0.2.1", self.port, tls=stranger.context(f"mx.sts.{ZONE}")).start()
        self.https_port = free_port("127.0.2.9")
        self.policy_host = PolicyHost("127.0.2.9", self.https_port, self.ca.context(f"mta-sts.sts.{ZONE}")).start()
        self.policy_host.serve(f"mta-sts.sts.{ZONE}",
                               f"version: STSv1\r\nmode: enforce\r\nmx: mx.sts.{ZONE}\r\nmax_age: 86400\r\n")

    def stop(self):
        self.receiver.stop()
        self.policy_host.stop()
        self.nsd.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("tlsrpt"))
    yield w
    w.stop()


def make_sink(tmp_path, world: World) -> DeliverySink:
    settings = Settings.from_env().with_(
        blob_dir=tmp_path / "blobs", dns_resolver=world.nsd.address, mx_port=world.port,
        outbound_ca_file=world.ca.ca_file, mta_sts_https_port=world.https_port,
    )
    document = policy(delivery={"retry_schedule_seconds": [60], "give_up_after_seconds": 3600,
                                "connect_timeout_seconds": 5},
                      tls={"tls_reporting": {"report_from": "tlsrpt@example.test"}})
    return DeliverySink(settings, document, Recorder(), JsonIndex(tmp_path / "queue"))


def day_of_sessions(*domains: str) -> tlsrpt.Aggregate:
    events = []
    for domain in domains:
        events += [attempt(domain=f"{domain}.{ZONE}", mx=f"mx.{domain}.{ZONE}", policy="opportunistic", **OK),
                   attempt(domain=f"{domain}.{ZONE}", mx=f"mx.{domain}.{ZONE}", policy="opportunistic")]
    return tlsrpt.aggregate(DAY, events)


async def test_a_report_is_queued_to_the_rua_and_delivered_despite_the_domains_mta_sts(tmp_path, world):
    sink = make_sink(tmp_path, world)
    outcomes = await tlsrpt.queue_reports(sink, day_of_sessions("sts"))
    [outcome] = outcomes
    assert (outcome.outcome, outcome.rua) == ("queued", (f"tls-reports@sts.{ZONE}",))
    queued = [e for e in sink.publisher.events if isinstance(e, ev.DeliveryQueued)]
    assert [(e.message_id, e.source) for e in queued] == [(outcome.message_id, "tlsrpt")]

    entry = sink.queue.get(outcome.message_id)
    await deliver_and_publish(sink, entry)
    assert sink.queue.get(outcome.message_id)["done"]
    [received] = [m for m in world.receiver.messages() if b"TLS-Report-Domain: sts.rpt.test" in m.content]
    assert received.mail_from == "" and received.rcpt_to == [f"tls-reports@sts.{ZONE}"]
    assert received.tls is not None  # opportunistic TLS, with the untrusted certificate

    message = message_from_bytes(received.content, policy=default_policy)
    assert message.get_param("report-type") == "tlsrpt" and message["TLS-Report-Submitter"] == "example.test"
    [attachment] = [p for p in message.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(attachment.get_content()))
    jsonschema.validate(report, REPORT_SCHEMA)
    [entry_json] = report["policies"]
    assert entry_json["policy"]["policy-domain"] == f"sts.{ZONE}"
    assert entry_json["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert entry_json["failure-details"][0]["result-type"] == "starttls-not-supported"

    # The report's own delivery: MTA-STS not applied (5.3), and not in the next report (3).
    [sent] = [e for e in sink.publisher.events if isinstance(e, ev.DeliveryAttempted)]
    assert sent.tls.policy == "opportunistic" and not sent.tls.verified
    assert tlsrpt.aggregate(DAY + timedelta(days=1), [sent.model_copy(update={
        "occurred_at": NOON + timedelta(days=1)})]).domains == {}


async def test_a_report_is_queued_once(tmp_path, world):
    sink = make_sink(tmp_path, world)
    found = day_of_sessions("sts")
    [first] = await tlsrpt.queue_reports(sink, found)
    [again] = await tlsrpt.queue_reports(sink, found)
    assert (first.outcome, again.outcome) == ("queued", "already-queued")
    # Another delivery process (its own queue) that sees the announcement on mail.deliveries.
    other = make_sink(tmp_path / "other", world)
    [elsewhere] = await tlsrpt.queue_reports(other, found, queued={first.message_id})
    assert elsewhere.outcome == "already-queued" and first.message_id not in other.queue


async def test_one_report_goes_to_every_mailto_of_the_rua(tmp_path, world):
    sink = make_sink(tmp_path, world)
    [outcome] = await tlsrpt.queue_reports(sink, day_of_sessions("multi"))
    assert outcome.rua == (f"a@sts.{ZONE}", f"b@sts.{ZONE}")
    assert list(sink.queue.get(outcome.message_id)["recipients"]) == [f"a@sts.{ZONE}", f"b@sts.{ZONE}"]


async def test_domains_without_a_usable_record_get_no_report_and_say_why(tmp_path, world):
    sink = make_sink(tmp_path, world)
    outcomes = {o.domain: o for o in await tlsrpt.queue_reports(sink, day_of_sessions("none", "two", "bad", "web"))}
    assert {d: o.outcome for d, o in outcomes.items()} == {
        f"none.{ZONE}": "no-record", f"two.{ZONE}": "no-record", f"bad.{ZONE}": "invalid-record",
        f"web.{ZONE}": "https-only"}
    assert "2 v=TLSRPTv1 records" in outcomes[f"two.{ZONE}"].detail
    assert not list(sink.queue.items())


async def test_a_dns_failure_is_an_outcome_to_retry(tmp_path, world):
    sink = make_sink(tmp_path, world)
    sink.resolver.nameservers, sink.resolver.port = ["127.0.0.1"], free_port()  # nobody answers
    sink.resolver.lifetime = 1.0
    [outcome] = await tlsrpt.queue_reports(sink, day_of_sessions("sts"))
    assert outcome.outcome == "dns-error" and outcome.temporary
    assert not list(sink.queue.items())


async def test_nothing_is_sent_when_tls_reporting_is_off(tmp_path, world):
    sink = make_sink(tmp_path, world)
    sink.policy = type(sink.policy).of(policy(tls={"tls_reporting": {"enabled": False}}))
    assert await tlsrpt.send_reports(sink.settings, sink, DAY) == []


@pytest.fixture(scope="module")
def submitter_keys(tmp_path_factory):
    """The submitter's (example.test) DKIM keys, and one for its TLS reports alone, served by NSD."""
    keys = TestKeys(tmp_path_factory.mktemp("dkim"), "example.test")
    keys.add("reports2026", "rsa-sha256", use="tlsrpt")
    nsd = Nsd(tmp_path_factory.mktemp("dkim-nsd"), {"example.test": keys.zone_records()}).start()
    yield keys, nsd_dnsfunc(nsd.address)
    nsd.stop()


async def test_the_report_is_dkim_signed_by_the_submitters_domain(tmp_path, world, submitter_keys, caplog):
    # Section 3: a report without a valid signature of the reporting domain MUST be ignored.
    keys, dnsfunc = submitter_keys
    signed_policy = dict(delivery={"retry_schedule_seconds": [60], "give_up_after_seconds": 3600,
                                   "connect_timeout_seconds": 5},
                         tls={"tls_reporting": {"report_from": "tlsrpt@example.test"}})

    async def deliver_report(dkim_signing, directory):
        sink = make_sink(tmp_path / directory, world)
        sink.policy = type(sink.policy).of(policy(**signed_policy, dkim_signing=dkim_signing))
        before = len(world.receiver.messages())
        [outcome] = await tlsrpt.queue_reports(sink, day_of_sessions("sts"))
        await deliver_and_publish(sink, sink.queue.get(outcome.message_id))
        [received] = world.receiver.messages()[before:]
        assert b"TLS-Report-Submitter: example.test" in received.content
        return received.content

    # The domain's own keys: both signatures, d= the submitter's domain, no l=.
    content = await deliver_report(keys.policy(), "domain-keys")
    assert verify_all(content, dnsfunc, tlsrpt=True) == [True, True]
    assert all(s[b"d"] == b"example.test" and b"l" not in s for s in signatures(content))
    # A key for TLS reports (its record says s=tlsrpt): that one alone, and it passes
    # the strict reading (RFC 8460 section 3's "SHOULD contain s=tlsrpt").
    content = await deliver_report({"keys": [*keys.policy()["keys"], keys.policy_key(
        "reports2026", "rsa-sha256", use="tlsrpt")]}, "report-key")
    assert [s[b"s"] for s in signatures(content)] == [b"reports2026"]
    assert verify_all(content, dnsfunc, tlsrpt="strict") == [True]
    # No key for the submitter's domain: the report still goes (the mail is the organisation's
    # own, nothing to forge), unsigned, and the log says receivers will ignore it.
    content = await deliver_report({"keys": []}, "no-keys")
    assert signatures(content) == []
    assert any("leaves unsigned: no DKIM key for example.test" in r.getMessage() for r in caplog.records)


def test_the_table_shows_each_domain_with_its_failures_by_result_type():
    events = [attempt(policy="mta-sts-testing", **OK),
              attempt(policy="mta-sts-testing", version="TLSv1.2", failure="certificate-expired",
                      verify_error="certificate-expired: certificate has expired"),
              attempt(domain="plain.example", mx="mx.plain.example", policy="opportunistic", ip=None)]
    text = tlsrpt.render(tlsrpt.aggregate(DAY, events, [sts_fetched()]))
    lines = text.splitlines()
    assert lines[0] == "partner.example: 1 successful, 1 failed"
    assert "sts (testing; mx mx1.partner.example, *.backup.partner.example)" in lines[1]
    assert re.search(r"certificate-expired\s+1\s+mx1.partner.example \[192.0.2.7\]\s+certificate-expired: "
                     r"certificate has expired", lines[2])
    assert lines[3] == "plain.example: 0 successful, 1 failed"
    assert re.search(r"starttls-not-supported\s+1\s+mx.plain.example$", lines[5])


# -- the daily job ---------------------------------------------------------------------------


async def test_the_daily_job_reports_yesterday_and_retries_what_failed(monkeypatch):
    import asyncio

    calls: list[tuple[date, set[str] | None]] = []
    answers = [RuntimeError("Kafka unreachable"),
               [tlsrpt.ReportOutcome("a.example", "queued"), tlsrpt.ReportOutcome("b.example", "dns-error")],
               [tlsrpt.ReportOutcome("b.example", "queued")]]
    finished = asyncio.Event()

    async def send_reports(settings, sink, day, only=None):
        calls.append((day, only))
        answer = answers.pop(0)
        if not answers:
            finished.set()
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(tlsrpt, "send_reports", send_reports)
    monkeypatch.setattr(tlsrpt, "RETRY_SECONDS", 0.01)
    job = asyncio.create_task(tlsrpt.reporter(None, None, delay_max=0.02))
    try:
        await asyncio.wait_for(finished.wait(), 10)
        await asyncio.sleep(0.1)  # then it waits for the next midnight
    finally:
        job.cancel()
    yesterday = ev.utcnow().date() - timedelta(days=1)
    assert calls == [(yesterday, None), (yesterday, None), (yesterday, {"b.example"})]


async def test_the_daily_job_reports_each_day_once_it_is_over(monkeypatch):
    import asyncio
    import time as clock

    started, base = clock.monotonic(), datetime(2026, 11, 30, 23, 59, 59, 800000, tzinfo=timezone.utc)
    days: list[date] = []
    two = asyncio.Event()

    async def send_reports(settings, sink, day, only=None):
        days.append(day)
        if len(days) == 2:
            two.set()
        return []

    monkeypatch.setattr(tlsrpt, "utcnow", lambda: base + timedelta(seconds=clock.monotonic() - started))
    monkeypatch.setattr(tlsrpt, "send_reports", send_reports)
    job = asyncio.create_task(tlsrpt.reporter(None, None, delay_max=0.01))
    try:
        await asyncio.wait_for(two.wait(), 10)
    finally:
        job.cancel()
    # Started just before midnight: the day before is reported at once, the
    # ending day just after midnight.
    assert days == [date(2026, 11, 29), date(2026, 11, 30)]

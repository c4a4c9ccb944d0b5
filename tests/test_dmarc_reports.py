"""DMARC aggregate reports received: the report addresses, reading a report mail, the events, the sink, the command.

The reports are tests/dmarc_samples.py's, in each form section 7.2.1.1
allows (gzip, zip, plain XML), and broken ones: malformed XML, a DTD with
entities, a decompression bomb, a mail with no report. Each broken one is an
event with the reason; none raises.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from datetime import datetime, timezone

import jsonschema
import pytest

from bulwark.cli.dmarc import summarise
from bulwark.policy import Policy, PolicyError, parse
from bulwark.settings import Settings
from schemas import codec
from schemas import events as ev
from schemas.jsonschema import JSON_DIR
from schemas.topics import DMARC_REPORTS, record_key, topic_for
from sinks.dmarc_aggregate import PART_BYTES, Report, Unreadable, inflate, parse_report, read_reports, split_rows
from sinks.dmarc_reports import DmarcReportSink
from sinks.store import JsonIndex
from tests.dmarc_samples import GOOGLE_XML, in_form, report_mail, report_xml, row_xml, zipped

MIB = 1024 * 1024
POLICY = """\
hostname: gw.example.test
local_domains: [example.test, other.test]
mail_servers: [{name: mx, host: 10.0.0.5, default: true}]
"""


def raw(msg) -> bytes:
    return msg.as_bytes()


def only(found):
    assert len(found) == 1, found
    return found[0]


# -- the policy ---------------------------------------------------------------------


def test_report_addresses_default_to_none_and_are_normalised():
    assert parse(POLICY).dmarc_reports.addresses == []
    policy = parse(POLICY + "dmarc_reports:\n  addresses: [DMARC@Example.Test, '<rua@other.test>']\n")
    assert policy.dmarc_reports.addresses == ["dmarc@example.test", "rua@other.test"]
    assert policy.dmarc_reports.is_report_address("Dmarc@EXAMPLE.test")
    assert not policy.dmarc_reports.is_report_address("someone@example.test")
    assert policy.dmarc_reports.max_report_bytes == 16 * MIB


def test_a_report_address_outside_the_local_domains_or_not_an_address_is_refused_at_its_line():
    with pytest.raises(PolicyError) as caught:
        parse(POLICY + "dmarc_reports:\n  addresses:\n    - rua@example.test\n    - rua@elsewhere.test\n", "p.yaml")
    assert "p.yaml:7: dmarc_reports.addresses.1: rua@elsewhere.test is not in a local domain" in str(caught.value)
    with pytest.raises(PolicyError, match="dmarc_reports.addresses.0.*'example.test' is not an email address"):
        parse(POLICY + "dmarc_reports: {addresses: [example.test]}\n")
    with pytest.raises(PolicyError, match="dmarc_reports.max_report_bytes"):
        parse(POLICY + "dmarc_reports: {max_report_bytes: 10}\n")


# -- reading a report --------------------------------------------------------------


def test_a_providers_report_is_read_whole():
    fields, rows = parse_report(GOOGLE_XML)
    assert fields["report_key"] == "google.com!5717107811868587391"
    assert (fields["org_name"], fields["email"]) == ("google.com", "noreply-dmarc-support@google.com")
    assert fields["extra_contact_info"] == "https://support.google.com/a/answer/2466580"
    assert fields["date_begin"] == datetime(2026, 11, 30, tzinfo=timezone.utc)
    assert fields["date_end"] == datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc)
    assert fields["policy_published"] == ev.DmarcPolicyPublished(domain="example.test", adkim="r", aspf="r", p="none",
                                                                 sp="none", pct=100, fo="0")
    assert [(r.source_ip, r.count, r.disposition, r.dkim, r.spf) for r in rows] == [
        ("192.0.2.10", 12, "none", "pass", "pass"),
        ("2001:db8::25", 3, "none", "pass", "fail"),
        ("203.0.113.66", 5, "none", "fail", "fail"),
    ]
    forwarded = rows[1]
    assert forwarded.header_from == "example.test"  # domains are compared lower case
    assert forwarded.envelope_from == "lists.example.org" and forwarded.reasons == ["forwarded: mailing list"]
    assert [(d.domain, d.selector, d.result) for d in forwarded.dkim_results] == [
        ("example.test", "s2026a", "pass"), ("lists.example.org", None, "pass")]
    assert [(s.domain, s.scope, s.result) for s in rows[2].spf_results] == [("spoofer.example", "mfrom", "softfail")]


@pytest.mark.parametrize("kind", ["gzip", "zip", "xml"])
def test_each_form_section_7_2_1_1_allows_is_read_from_the_mail(kind):
    found = only(read_reports(raw(report_mail(in_form(GOOGLE_XML, kind), kind)), MIB))
    assert isinstance(found, Report)
    assert found.fields["report_id"] == "5717107811868587391" and len(found.rows) == 3
    expected = {"gzip": "application/gzip", "zip": "application/zip", "xml": "text/xml"}[kind]
    assert found.content_type == expected
    suffix = {"gzip": ".xml.gz", "zip": None, "xml": ".xml"}[kind]
    assert found.attachment == (f"google.com!example.test!1795996800!1796083199{suffix}" if suffix else "report.xml")


def test_the_form_is_told_by_the_bytes_not_by_the_label():
    mail = report_mail(in_form(GOOGLE_XML, "gzip"), "gzip", content_type=("application", "octet-stream"),
                       filename="report")
    assert isinstance(only(read_reports(raw(mail), MIB)), Report)
    # A report sent as the whole mail, with no multipart around it.
    from email.message import EmailMessage

    bare = EmailMessage()
    bare["From"] = "dmarc@reporter.example"
    bare.set_content(gzip.compress(report_xml()), maintype="application", subtype="x-gzip", filename="r.xml.gz")
    assert only(read_reports(raw(bare), MIB)).fields["org_name"] == "Yahoo"


def test_a_dmarcbis_namespace_reads_the_same():
    found = parse_report(report_xml(namespace="urn:ietf:params:xml:ns:dmarc-2.0"))
    assert found[0]["policy_published"].p == "quarantine" and found[1][0].source_ip == "198.51.100.7"


@pytest.mark.parametrize("xml, error", [
    (b"<feedback><report_metadata>", "not well-formed XML"),
    (b"<?xml version='1.0'?><html><body>hello</body></html>", "root element is <html>, not <feedback>"),
    (report_xml().replace(b"<org_name>Yahoo</org_name>", b""), "report_metadata/org_name is missing"),
    (report_xml(rows=[row_xml("not-an-ip", 1)]), "row/source_ip is not an IP address: 'not-an-ip'"),
    (report_xml(rows=[row_xml("192.0.2.1", -4)]), "row/count is out of range: -4"),
    (report_xml(rows=[row_xml("192.0.2.1", "many")]), "row/count is not a number: 'many'"),
    (report_xml(begin=1796083199, end=1795996800), "ends (2026-11-30 00:00) before it begins"),
    (report_xml(org="x" * 600), "report_metadata/org_name is 600 characters long"),
    (report_xml().replace(b"<policy_published>", b"<policy_publish>").replace(b"</policy_published>",
                                                                             b"</policy_publish>"),
     "feedback/policy_published is missing"),
])
def test_a_malformed_report_is_unreadable_with_the_reason(xml, error):
    found = only(read_reports(raw(report_mail(gzip.compress(xml))), MIB))
    assert isinstance(found, Unreadable) and error in found.error, found
    assert found.part == 1 and found.attachment.endswith(".xml.gz")


def test_entities_are_never_expanded():
    laughs = (b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY a "aaaaaaaaaa">'
              b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><feedback>&b;</feedback>')
    external = (b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b'<feedback>&x;</feedback>')
    for xml in (laughs, external):
        found = only(read_reports(raw(report_mail(xml, "xml")), MIB))
        assert isinstance(found, Unreadable) and "DTDForbidden" in found.error


def test_a_gzip_bomb_is_unreadable_and_never_inflated_past_the_limit():
    bomb = gzip.compress(b"<feedback>" + b" " * (64 * MIB))  # 64 MiB of XML in about 64 KiB
    assert len(bomb) < MIB
    found = only(read_reports(raw(report_mail(bomb)), 1 * MIB))
    assert isinstance(found, Unreadable)
    assert found.error == f"the gzip inflates past {MIB} bytes (max_report_bytes): not read"
    assert found.size == len(bomb)


def test_a_zip_bomb_is_unreadable_whatever_its_directory_claims():
    bomb = zipped(b" " * (8 * MIB))
    # Claim a small size in both headers: the limit is on what is read, not what is said.
    lied = bomb.replace((8 * MIB).to_bytes(4, "little"), (100).to_bytes(4, "little"))
    for archive in (bomb, lied):
        found = only(read_reports(raw(report_mail(archive, "zip")), MIB))
        assert isinstance(found, Unreadable)
        assert "zip" in found.error and ("inflates past" in found.error or "not a readable zip" in found.error)
    # Members together count against the one limit.
    many = zipped(b" " * (MIB // 2), "a.xml", ("b.xml", b" " * (MIB // 2)), ("c.xml", b" " * (MIB // 2)))
    assert inflate(many, 2 * MIB) and "inflates past" in only(read_reports(raw(report_mail(many, "zip")), MIB)).error


def test_broken_archives_are_unreadable_not_raised():
    truncated = gzip.compress(GOOGLE_XML)[:40]
    assert "not a readable gzip" in only(read_reports(raw(report_mail(truncated)), MIB)).error
    assert "not a readable zip" in only(read_reports(raw(report_mail(b"PK\x03\x04garbage", "zip")), MIB)).error
    assert "the zip is empty" in only(read_reports(raw(report_mail(_empty_zip(), "zip")), MIB)).error


def _empty_zip() -> bytes:
    buffer = io.BytesIO()
    zipfile.ZipFile(buffer, "w").close()
    return b"PK\x03\x04" + buffer.getvalue()  # a local header signature in front of an empty archive


def test_a_mail_without_a_report_is_unreadable_as_a_whole():
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = "someone@partner.test"
    msg.set_content("Hi, is this the right address for DMARC questions?\n")
    found = only(read_reports(raw(msg), MIB))
    assert isinstance(found, Unreadable) and found.part == 0
    assert found.error == "no aggregate report attached (no gzip, zip or XML part)"


def test_one_bad_report_does_not_hide_a_good_one_in_the_same_mail():
    msg = report_mail(gzip.compress(b"<feedback>"))
    msg.add_attachment(gzip.compress(report_xml()), maintype="application", subtype="gzip", filename="y.xml.gz")
    bad, good = read_reports(raw(msg), MIB)
    assert isinstance(bad, Unreadable) and bad.part == 1
    assert isinstance(good, Report) and good.fields["report_key"] == "Yahoo!1764547200.123456"


def test_rows_are_split_into_parts_that_fit_a_kafka_record():
    _, rows = parse_report(report_xml(rows=[row_xml(f"10.0.{i // 250}.{i % 250}", i) for i in range(6000)]))
    groups = split_rows(rows)
    assert len(groups) > 1 and sum(groups, []) == rows
    assert all(sum(len(r.model_dump_json()) for r in group) <= PART_BYTES for group in groups)
    assert split_rows([]) == [[]]


# -- the events ----------------------------------------------------------------------


def _received(**fields) -> ev.DmarcReportMessage:
    return ev.DmarcReportMessage(mail_from="bounce@google.com", from_header="noreply-dmarc-support@google.com",
                                 client_ip="192.0.2.99", dmarc="DMARC_PASS", attachment="r.xml.gz",
                                 content_type="application/gzip", **fields)


def test_report_events_are_keyed_by_report_on_dmarc_reports_and_match_their_json_schema():
    fields, rows = parse_report(GOOGLE_XML)
    event = ev.DmarcReportReceived(message_id="m1", **fields, records=rows, received=_received())
    assert topic_for(ev.DmarcReportReceived) is DMARC_REPORTS and DMARC_REPORTS.kind == "audit"
    assert record_key(DMARC_REPORTS, event) == b"google.com!5717107811868587391"
    value, headers = codec.encode(event)
    assert codec.decode(value, headers) == event
    schema = json.loads((JSON_DIR / "dmarc.report_received.v1.json").read_text())
    jsonschema.validate(json.loads(value), schema)
    document = json.loads(value)
    assert document["records"][0] == {
        "source_ip": "192.0.2.10", "count": 12, "disposition": "none", "dkim": "pass", "spf": "pass", "reasons": [],
        "header_from": "example.test", "envelope_from": "example.test", "envelope_to": None,
        "dkim_results": [{"domain": "example.test", "selector": "s2026a", "result": "pass", "human_result": None}],
        "spf_results": [{"domain": "example.test", "scope": "mfrom", "result": "pass"}],
    }
    assert (document["part"], document["parts"]) == (1, 1)

    unreadable = ev.DmarcReportUnreadable(message_id="m2", report_key="m2#1", error="not well-formed XML",
                                          size=40, received=_received())
    assert topic_for(ev.DmarcReportUnreadable) is DMARC_REPORTS
    jsonschema.validate(json.loads(codec.encode(unreadable)[0]),
                        json.loads((JSON_DIR / "dmarc.report_unreadable.v1.json").read_text()))


# -- the sink ------------------------------------------------------------------------


class Publisher:
    def __init__(self):
        self.events = []

    async def publish(self, event):
        self.events.append(event)


@pytest.fixture
def sink(tmp_path):
    policy = Policy.model_validate({**parse(POLICY).model_dump(), "dmarc_reports": {
        "addresses": ["dmarc-reports@example.test"], "max_report_bytes": 4 * MIB}})
    settings = Settings.from_env().with_(data_dir=tmp_path, blob_dir=tmp_path / "blobs")
    index = JsonIndex(tmp_path / "handled")
    made = DmarcReportSink(settings, policy, Publisher(), index)
    yield made
    index.close()


def _verdict(sink, message, action="deliver", rcpt="dmarc-reports@example.test", dmarc="DMARC_PASS",
             message_id="m1") -> ev.Verdict:
    digest = sink.blobs.put_sync(raw(message))
    envelope = ev.Envelope(mail_from="bounce@google.com", rcpt_to=["postmaster@example.test", rcpt], sha256=digest,
                           size=10, client_ip="192.0.2.99", received_at=datetime.now(timezone.utc))
    results = [ev.CheckResult(check="dmarc", name=dmarc, outcome="pass")] if dmarc else []
    return ev.Verdict(message_id=message_id, session_id="s1", action=action, results=results, policy_version="v",
                      envelope=envelope, direction="inbound")


async def test_the_sink_publishes_each_report_of_a_delivered_report_mail_once(sink):
    mail = report_mail(in_form(GOOGLE_XML, "zip"), "zip")
    verdict = _verdict(sink, mail)
    await sink.take([verdict])
    event = only(sink.publisher.events)
    assert isinstance(event, ev.DmarcReportReceived)
    assert (event.message_id, event.session_id, event.report_key) == ("m1", "s1", "google.com!5717107811868587391")
    assert event.received == ev.DmarcReportMessage(
        mail_from="bounce@google.com", from_header="noreply-dmarc-support@google.com", client_ip="192.0.2.99",
        dmarc="DMARC_PASS", attachment="report.xml", content_type="application/zip")
    assert [r.count for r in event.records] == [12, 3, 5]
    await sink.take([verdict])  # redelivered after a restart: not read again
    assert len(sink.publisher.events) == 1


async def test_the_sink_reads_only_delivered_mail_to_a_report_address(sink):
    mail = report_mail(in_form(GOOGLE_XML, "gzip"))
    await sink.take([
        _verdict(sink, mail, rcpt="alice@example.test", message_id="other"),
        _verdict(sink, mail, action="quarantine", message_id="held"),
        _verdict(sink, mail, action="reject", message_id="refused"),
    ])
    assert sink.publisher.events == []
    held = _verdict(sink, mail, action="quarantine", message_id="held")
    await sink.take([ev.QuarantineReleased(message_id="held", envelope=held.envelope, by="admin", reason="expected")])
    released = only(sink.publisher.events)
    assert released.message_id == "held" and released.received.dmarc is None


async def test_an_unreadable_report_is_an_event_and_the_sink_goes_on(sink):
    bomb = report_mail(gzip.compress(b" " * (8 * MIB)))
    good = report_mail(in_form(report_xml(), "xml"), "xml")
    await sink.take([_verdict(sink, bomb, message_id="bomb"), _verdict(sink, good, message_id="good")])
    unreadable, report = sink.publisher.events
    assert isinstance(unreadable, ev.DmarcReportUnreadable) and unreadable.report_key == "bomb#1"
    assert "inflates past" in unreadable.error and unreadable.received.attachment.endswith(".xml.gz")
    assert isinstance(report, ev.DmarcReportReceived) and report.message_id == "good"


async def test_a_large_report_is_published_in_parts_under_one_key(sink):
    xml = report_xml(rows=[row_xml(f"10.1.{i // 250}.{i % 250}", 1) for i in range(5000)])
    await sink.take([_verdict(sink, report_mail(gzip.compress(xml)))])
    parts = sink.publisher.events
    assert len(parts) > 1 and {p.report_key for p in parts} == {"Yahoo!1764547200.123456"}
    assert [(p.part, p.parts) for p in parts] == [(i, len(parts)) for i in range(1, len(parts) + 1)]
    assert sum(len(p.records) for p in parts) == 5000
    assert all(len(codec.encode(p)[0]) < 1_000_000 for p in parts)


async def test_a_missing_blob_is_recorded_not_raised(sink):
    verdict = _verdict(sink, report_mail(gzip.compress(report_xml())))
    sink.blobs.path(verdict.envelope.sha256).unlink()
    await sink.take([verdict])
    event = only(sink.publisher.events)
    assert isinstance(event, ev.DmarcReportUnreadable) and event.report_key == "m1#0"
    assert "not in the blob store" in event.error


# -- bulwark dmarc report ---------------------------------------------------------------


def _report(xml: bytes, message_id: str = "m1", at: datetime | None = None, **fields) -> ev.DmarcReportReceived:
    parsed, rows = parse_report(xml)
    return ev.DmarcReportReceived(message_id=message_id, **{**parsed, **fields}, records=rows, received=_received(),
                                  **({"occurred_at": at} if at else {}))


def _topic() -> list[ev.Event]:
    yahoo_day1 = report_xml(report_id="y1", rows=[row_xml("198.51.100.7", 40), row_xml("203.0.113.66", 9,
                                                                                         "quarantine", "fail", "fail")])
    yahoo_day2 = report_xml(report_id="y2", begin=1796083200, end=1796169599,
                            rows=[row_xml("198.51.100.7", 60), row_xml("198.51.100.8", 1, dkim="fail")])
    other_domain = report_xml(report_id="y3", domain="other.test", rows=[row_xml("192.0.2.1", 2)])
    return [
        _report(GOOGLE_XML),
        _report(GOOGLE_XML, message_id="m1-again"),  # the reporter sent it twice
        _report(yahoo_day1, message_id="m2"),
        _report(yahoo_day2, message_id="m3"),
        _report(other_domain, message_id="m4"),
        ev.DmarcReportUnreadable(message_id="m5", report_key="m5#1", error="not well-formed XML: syntax error",
                                 size=10, received=_received(), occurred_at=datetime(2026, 12, 2, tzinfo=timezone.utc)),
    ]


def test_the_summary_counts_each_report_once_per_organisation_and_domain():
    summaries, unreadable = summarise(_topic())
    assert [(s.domain, s.org_name) for s in summaries] == [
        ("example.test", "google.com"), ("example.test", "Yahoo"), ("other.test", "Yahoo")]
    google, yahoo, _ = summaries
    assert (len(google.reports), google.messages) == (1, 20)  # the copy is not counted again
    assert google.dmarc == {"pass": 15, "fail": 5} and google.dkim == {"pass": 15, "fail": 5}
    assert google.spf == {"pass": 12, "fail": 8} and google.dispositions == {"none": 20}
    assert google.top_sources()[0] == {"ip": "192.0.2.10", "messages": 12, "dmarc_fail": 0}
    assert {"ip": "203.0.113.66", "messages": 5, "dmarc_fail": 5} in google.top_sources()
    assert (len(yahoo.reports), yahoo.messages) == (2, 110)
    assert yahoo.dispositions == {"none": 101, "quarantine": 9} and yahoo.dmarc == {"pass": 101, "fail": 9}
    assert yahoo.begin == datetime(2026, 11, 30, tzinfo=timezone.utc)
    assert yahoo.end == datetime(2026, 12, 1, 23, 59, 59, tzinfo=timezone.utc)
    assert yahoo.top_sources(1) == [{"ip": "198.51.100.7", "messages": 100, "dmarc_fail": 0}]
    assert [u.message_id for u in unreadable] == ["m5"]


def test_the_summary_is_filtered_by_domain_and_by_the_end_of_the_period():
    summaries, unreadable = summarise(_topic(), domain="other.test")
    assert [(s.org_name, s.messages) for s in summaries] == [("Yahoo", 2)] and unreadable == []
    summaries, unreadable = summarise(_topic(), since=datetime(2026, 12, 1, tzinfo=timezone.utc))
    assert [(s.org_name, len(s.reports), s.messages) for s in summaries] == [("Yahoo", 1, 61)]
    assert len(unreadable) == 1


def test_parts_of_one_report_are_summed_as_one_report():
    xml = report_xml(rows=[row_xml("10.0.0.1", 1), row_xml("10.0.0.2", 2)])
    parsed, rows = parse_report(xml)
    parts = [ev.DmarcReportReceived(message_id="m", **parsed, records=[row], part=i, parts=2, received=_received())
             for i, row in enumerate(rows, 1)]
    (summary,), _ = summarise(parts + parts)
    assert (len(summary.reports), summary.messages) == (1, 3)


def test_bulwark_dmarc_report_prints_the_summary_and_json(monkeypatch):
    from click.testing import CliRunner

    from bulwark.cli import dmarc as dmarc_cli
    from bulwark.cli import main

    async def topic(settings):
        return _topic()

    monkeypatch.setattr(dmarc_cli, "read_reports", topic)
    runner = CliRunner()
    result = runner.invoke(main, ["dmarc", "report"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("example.test reported by google.com (p=none sp=none pct=100): 1 report, "
                        "2026-11-30 00:00 to 2026-11-30 23:59 UTC")
    assert lines[1:7] == [
        "  messages      20",
        "  DMARC         pass 15, fail 5",
        "  DKIM aligned  pass 15, fail 5",
        "  SPF aligned   pass 12, fail 8",
        "  dispositions  none 20",
        "  top source IPs (messages, of which DMARC fail):",
    ]
    assert lines[7].split() == ["192.0.2.10", "12", "0"] and lines[8].split() == ["203.0.113.66", "5", "5"]
    assert "example.test reported by Yahoo (p=quarantine pct=100): 2 reports" in result.output
    assert "unreadable reports: 1" in result.output
    assert "m5  from noreply-dmarc-support@google.com [192.0.2.99]: not well-formed XML: syntax error" in result.output

    result = runner.invoke(main, ["dmarc", "report", "--domain", "Example.Test.", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["kind"], r["org_name"], r["messages"]) for r in rows] == [
        ("summary", "google.com", 20), ("summary", "Yahoo", 110)]
    assert rows[0]["dmarc"] == {"pass": 15, "fail": 5} and rows[0]["spf_aligned"] == {"pass": 12, "fail": 8}
    assert rows[0]["policy_published"]["p"] == "none" and rows[0]["begin"] == "2026-11-30T00:00:00+00:00"
    assert rows[0]["top_source_ips"][0] == {"ip": "192.0.2.10", "messages": 12, "dmarc_fail": 0}

    result = runner.invoke(main, ["dmarc", "report", "--since", "2027-01-01"])
    assert result.exit_code == 0 and result.output.startswith("no DMARC aggregate reports ending after 2027-01-01")
    result = runner.invoke(main, ["dmarc", "report", "--since", "yesterday"])
    assert result.exit_code == 2 and "'yesterday' is not a date" in result.output

"""DMARC aggregate reports through the real stack: a reporter mails the report address, `bulwark dmarc report` shows it.

The reports are sent from 127.0.8.x as a mailbox provider sends them (a
gzipped report about the local domain, from a domain whose SPF authorises
loopback), to the address the test policy lists under
``dmarc_reports.addresses``. The DMARC reports sink, started with the rest
of the stack, publishes them on dmarc.reports; the messages themselves are
delivered downstream like any other, the unreadable one included.
"""

from __future__ import annotations

import gzip
import json
import uuid

import pytest

from schemas import events as ev
from schemas.topics import DMARC_REPORTS
from tests.dmarc_samples import report_mail, report_xml, row_xml

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

REPORT_ADDRESS = f"dmarc-reports@{LOCAL_DOMAIN}"
REPORTER = "noreply-dmarc@partner.test"  # partner.test's SPF authorises 127.0.0.0/8


def _wait_event(gateway, queue_id: str) -> list[ev.Event]:
    return [r.event for r in gateway.wait_records(lambda r: r.event.message_id == queue_id, [DMARC_REPORTS.name],
                                                  timeout=60, what=f"dmarc.reports events for {queue_id}")]


def test_a_mailed_report_becomes_an_event_and_shows_in_bulwark_dmarc_report(gateway):
    org = f"Reporter {uuid.uuid4().hex[:8]}"
    xml = report_xml(org=org, report_id="r-1", domain=LOCAL_DOMAIN, p="none", email=REPORTER, rows=[
        row_xml("192.0.2.10", 30),
        row_xml("203.0.113.66", 4, dkim="fail", spf="fail", header_from=LOCAL_DOMAIN),
    ])
    mail = report_mail(gzip.compress(xml), "gzip", sender=REPORTER, to=REPORT_ADDRESS, domain=LOCAL_DOMAIN,
                       receiver="partner.test")
    queue_id = gateway.send(mail, source_ip="127.0.8.1")

    [event] = _wait_event(gateway, queue_id)
    assert isinstance(event, ev.DmarcReportReceived)
    assert (event.report_key, event.org_name, event.policy_published.domain) == (f"{org}!r-1", org, LOCAL_DOMAIN)
    assert [(r.source_ip, r.count, r.dkim, r.spf) for r in event.records] == [
        ("192.0.2.10", 30, "pass", "pass"), ("203.0.113.66", 4, "fail", "fail")]
    assert (event.received.mail_from, event.received.client_ip) == (REPORTER, "127.0.8.1")
    assert event.received.dmarc == "DMARC_NONE"  # partner.test publishes no DMARC record
    # Delivered as its verdict says: the report address is a mailbox like any other.
    gateway.downstream.wait_for(lambda d: REPORT_ADDRESS in d.rcpt_to and mail["Message-ID"] in d.text,
                                timeout=60, what="the report mail downstream")

    shown = gateway.cli("dmarc", "report", "--domain", LOCAL_DOMAIN).stdout
    block = shown.split(f"{LOCAL_DOMAIN} reported by {org} (p=none pct=100): 1 report, "
                        "2026-11-30 00:00 to 2026-11-30 23:59 UTC\n", 1)[1].split("\n\n", 1)[0]
    assert block.splitlines()[:5] == [
        "  messages      34",
        "  DMARC         pass 30, fail 4",
        "  DKIM aligned  pass 30, fail 4",
        "  SPF aligned   pass 30, fail 4",
        "  dispositions  none 34",
    ]
    assert block.splitlines()[6].split() == ["192.0.2.10", "30", "0"]
    assert block.splitlines()[7].split() == ["203.0.113.66", "4", "4"]
    rows = [json.loads(line) for line in gateway.cli("dmarc", "report", "--json").stdout.splitlines()]
    [mine] = [r for r in rows if r.get("org_name") == org]
    assert (mine["reports"], mine["messages"], mine["dmarc"]) == (1, 34, {"pass": 30, "fail": 4})


def test_a_malformed_report_is_an_event_with_the_reason_and_the_mail_is_still_delivered(gateway):
    marker = uuid.uuid4().hex[:10]
    mail = report_mail(f"<feedback><report_metadata>{marker}".encode(), "xml", sender=REPORTER, to=REPORT_ADDRESS,
                       domain=LOCAL_DOMAIN, receiver="partner.test")
    queue_id = gateway.send(mail, source_ip="127.0.8.2")

    [event] = _wait_event(gateway, queue_id)
    assert isinstance(event, ev.DmarcReportUnreadable) and event.report_key == f"{queue_id}#1"
    assert event.error.startswith("not well-formed XML") and event.received.content_type == "text/xml"
    gateway.downstream.wait_for(lambda d: mail["Message-ID"] in d.text, timeout=60,
                                what="the malformed report's mail downstream")
    shown = gateway.cli("dmarc", "report").stdout
    assert f"{queue_id}  from {REPORTER} [127.0.8.2]: not well-formed XML" in shown


"""Delivery status notifications are RFC 3464 reports a mail client can read."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone

from schemas.events import Envelope, RecipientResult
from sinks.delivery import received_header
from sinks.dsn import build_dsn
from bulwark.policy import parse

ENVELOPE = Envelope(mail_from="alice@partner.test", rcpt_to=["bob@example.test", "eve@example.test"],
                    sha256="0" * 64, size=1, client_ip="192.0.2.9", client_helo="mx.partner.test",
                    received_at=datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc))


def test_dsn_is_a_delivery_status_report_with_the_original_headers():
    bounced = [
        RecipientResult(recipient="bob@example.test", outcome="bounced", reply_code=550, reply="5.1.1 No such user"),
        RecipientResult(recipient="eve@example.test", outcome="bounced", reply_code=None, reply=None),
    ]
    raw = build_dsn("gw.example.test", "m42", ENVELOPE, bounced, "mx.example.test",
                    b"Subject: quarterly figures\r\nFrom: alice@partner.test\r\n\r\nsecret body\r\n")
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == "alice@partner.test" and report["Auto-Submitted"] == "auto-replied"
    human, status, headers = report.get_payload()
    assert "<bob@example.test>: 5.1.1 No such user" in human.get_content()
    text = status.as_string()
    assert "Reporting-MTA: dns; gw.example.test" in text
    assert "Final-Recipient: rfc822; bob@example.test" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in text
    # Still deferred when the delivery period ran out: a 4.4.7, not a 5xx.
    assert "Final-Recipient: rfc822; eve@example.test" in text and "Status: 4.4.7" in text
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: quarterly figures" in headers.get_content()
    assert b"secret body" not in raw  # headers only: the body is not sent back


def test_received_header_records_the_hop_into_the_gateway():
    policy = parse("hostname: gw.example.test\nlocal_domains: [example.test]\n")
    header = received_header(policy, "m42", ENVELOPE, ["bob@example.test"]).decode()
    assert header.startswith("Received: from mx.partner.test ([192.0.2.9])\r\n")
    assert "by gw.example.test (Bulwark) with ESMTP id m42" in header
    assert "for <bob@example.test>; Sun, 01 Mar 2026 12:00:00 +0000\r\n" in header
    tls = ENVELOPE.model_copy(update={"tls": "TLSv1.3", "authenticated_user": "alice"})
    assert "with ESMTPSA id" in received_header(policy, "m42", tls, ["a@x.test", "b@x.test"]).decode()

"""The Authentication-Results header (RFC 8601): written safely, and at the downstream only the gateway's own."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from bulwark.auth_results import authserv_id, header_value, resinfo, value, without_own
from bulwark.policy import Policy
from bulwark.settings import Settings
from schemas import events as ev
from sinks.delivery import DeliverySink
from sinks.store import JsonIndex

OWN = "gw.example.test"


def test_values_are_tokens_addresses_or_quoted_strings_and_never_break_the_line():
    assert value("auth.test") == "auth.test"
    assert value("alice@auth.test") == "alice@auth.test"
    assert value("no key at x") == '"no key at x"'
    assert value('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert value("evil@x;\r\n spf=pass") == '"evil@x;?? spf=pass"'
    assert resinfo("spf", "fail", [("smtp.mailfrom", "a b@c.test"), ("smtp.helo", None)], reason="not authorized",
                   comment="p(x)") == 'spf=fail (p\\(x\\)) reason="not authorized" smtp.mailfrom="a b@c.test"'


def test_the_header_is_folded_one_result_a_line():
    assert header_value(OWN, ["spf=pass smtp.mailfrom=a@b.test", "dkim=none"]) == \
        f"{OWN};\r\n\tspf=pass smtp.mailfrom=a@b.test;\r\n\tdkim=none"
    assert header_value(OWN, []) == f"{OWN}; none"


def test_the_authserv_id_is_read_past_comments_and_folding():
    assert authserv_id(" GW.Example.Test; spf=pass") == OWN
    assert authserv_id("(forged (nested)) gw.example.test.;dkim=pass") == OWN
    assert authserv_id("gw.example.test 1; none") == OWN
    assert authserv_id("  ") is None


def test_only_the_gateway_s_own_fields_are_removed_and_nothing_else_changes():
    raw = (b"Received: from a\r\n"
           b"Authentication-Results: GW.example.test; dkim=pass header.d=bank.test\r\n"
           b"authentication-results :\r\n\t(looks official) gw.example.test;\r\n spf=pass\r\n"
           b"Authentication-Results: mx.partner.test; spf=pass smtp.mailfrom=a@partner.test\r\n"
           b"Authentication-Results: gw.example.test.evil.test; dkim=pass\r\n"
           b"Subject: hello\r\n"
           b"\r\n"
           b"Authentication-Results: gw.example.test; this is the body\r\n")
    assert without_own(raw, OWN) == (
        b"Received: from a\r\n"
        b"Authentication-Results: mx.partner.test; spf=pass smtp.mailfrom=a@partner.test\r\n"
        b"Authentication-Results: gw.example.test.evil.test; dkim=pass\r\n"
        b"Subject: hello\r\n"
        b"\r\n"
        b"Authentication-Results: gw.example.test; this is the body\r\n")
    clean = b"Subject: hi\r\n\r\nbody\r\n"
    assert without_own(clean, OWN) is clean
    assert without_own(b"Authentication-Results: gw.example.test; x\nSubject: a\n\nb\n", OWN) == \
        b"Subject: a\n\nb\n"
    assert without_own(b"Authentication-Results: gw.example.test; x", OWN) == b""


class Publisher:
    def __init__(self):
        self.events = []

    async def publish(self, event):
        self.events.append(event)


async def test_the_delivery_sink_puts_the_verdict_s_header_first_and_removes_forged_ones(tmp_path):
    sent: list[bytes] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        sent.append(data)
        return [ev.RecipientResult(recipient=r, outcome="delivered", reply_code=250) for r in rcpts], None

    settings = Settings.from_env().with_(blob_dir=tmp_path / "blobs", delivery_poll_seconds=0.05)
    policy = Policy.model_validate({
        "hostname": OWN, "local_domains": ["example.test"], "tag_subject_prefix": "[T]",
        "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
    })
    sink = DeliverySink(settings, policy, Publisher(), JsonIndex(tmp_path / "queue"))
    sink._send = send
    raw = (b"Authentication-Results: gw.example.test; dmarc=pass header.from=bank.test\r\n"
           b"Authentication-Results: mx.partner.test; spf=pass\r\n"
           b"Subject: hello\r\n\r\nHello.\r\n")
    digest = await sink.blobs.put(raw)
    header = header_value(OWN, ["spf=fail smtp.mailfrom=a@bank.test", "dmarc=fail header.from=bank.test"])
    verdict = ev.Verdict(message_id="m1", action="deliver", results=[], policy_version="p", direction="inbound",
                         tags=["SPF_FAIL"], authentication_results=header,
                         envelope=ev.Envelope(mail_from="a@bank.test", rcpt_to=["bob@example.test"], sha256=digest,
                                              size=len(raw), client_ip="192.0.2.1",
                                              received_at=datetime.now(timezone.utc)))
    await sink.take([verdict])
    task = asyncio.create_task(sink.scheduler())
    try:
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    [data] = sent
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"Received: from unknown ([192.0.2.1])")
    added = data[data.index(b"Authentication-Results:"):]
    assert added.startswith(b"Authentication-Results: gw.example.test;\r\n\tspf=fail smtp.mailfrom=a@bank.test;"
                            b"\r\n\tdmarc=fail header.from=bank.test\r\nX-Bulwark-Tags: SPF_FAIL\r\n"
                            b"Authentication-Results: mx.partner.test; spf=pass\r\nSubject: [T] hello\r\n")
    assert b"dmarc=pass header.from=bank.test" not in data


def test_a_verdict_without_sender_authentication_adds_no_header(tmp_path):
    settings = Settings.from_env().with_(blob_dir=tmp_path / "blobs")
    policy = Policy.model_validate({"hostname": OWN, "local_domains": ["example.test"]})
    sink = DeliverySink(settings, policy, Publisher(), JsonIndex(tmp_path / "queue"))
    verdict = ev.Verdict(message_id="m1", action="deliver", results=[], policy_version="p", direction="outbound",
                         envelope=ev.Envelope(mail_from="a@example.test", rcpt_to=["b@partner.test"], sha256="0" * 64,
                                              size=1, client_ip="10.0.0.5", received_at=datetime.now(timezone.utc)))
    assert sink._work_from(verdict)["extra_headers"] == {}

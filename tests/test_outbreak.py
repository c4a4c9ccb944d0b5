"""Outbreak fingerprints: what makes two messages "the same campaign"."""

from __future__ import annotations

from datetime import datetime, timezone
from email.message import EmailMessage

from schemas.events import Envelope
from streams.message import Message
from streams.outbreak import fingerprints, normalise

CAMPAIGN = ("Dear customer {n}, your account {n}{n}{n} is locked. Confirm your details within 24 hours at "
            "https://login.bank-secure.example/verify?id={n} or it will be closed on 2026-12-0{d}. "
            "We apologise for the inconvenience. Customer service team.\n") * 2


def _message(body: str, attachment: bytes | None = None, html: str | None = None) -> Message:
    msg = EmailMessage()
    msg["Subject"] = "x"
    msg.set_content(body)
    if html:
        msg.add_alternative(html, subtype="html")
    if attachment:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="a.bin")
    env = Envelope(mail_from="a@b.test", rcpt_to=["c@d.test"], sha256="0" * 64, size=1, client_ip="192.0.2.1",
                   received_at=datetime.now(timezone.utc))
    return Message("m", "s", env, "inbound", msg.as_bytes())


def test_personalised_copies_of_a_campaign_share_the_body_fingerprint():
    one = fingerprints(_message(CAMPAIGN.format(n=17, d=1)))
    two = fingerprints(_message(CAMPAIGN.format(n=93821, d=4)))
    body = [fp for fp, kind in one.items() if kind == "body"]
    assert body and body[0] in two


def test_different_text_has_a_different_body_fingerprint():
    one = fingerprints(_message(CAMPAIGN.format(n=1, d=1)))
    other = fingerprints(_message(CAMPAIGN.format(n=1, d=1).replace("locked", "upgraded")))
    assert {fp for fp, k in one.items() if k == "body"} != {fp for fp, k in other.items() if k == "body"}


def test_urls_are_fingerprinted_by_host_from_text_and_html():
    one = fingerprints(_message("see https://evil.example/a?x=1", html='<a href="https://EVIL.example/b">x</a>'))
    two = fingerprints(_message("see https://evil.example/zzz"))
    assert [fp for fp, k in one.items() if k == "urls"] == [fp for fp, k in two.items() if k == "urls"]


def test_attachments_are_fingerprinted_by_content_but_small_ones_are_ignored():
    big = fingerprints(_message("hi", attachment=b"Z" * 4096))
    assert [k for k in big.values()] == ["attachment"]
    assert fingerprints(_message("hi", attachment=b"logo")) == {}


def test_short_bodies_are_not_fingerprinted():
    assert fingerprints(_message("Thanks!")) == {}


def test_normalise_reduces_urls_to_hosts_and_numbers_to_zero():
    assert normalise("Pay 120 EUR at https://Pay.Example/x?i=9  NOW") == "pay 0 eur at pay.example now"

"""Outbreak fingerprints: what makes two messages "the same campaign"."""

from __future__ import annotations

from datetime import datetime, timezone
from email.message import EmailMessage

import pytest

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


PHISH = ("Dear {name}, your account {n} is locked. Confirm your details within 24 hours at "
         "https://login.bank-secure.example/verify?id={n} or it will be closed soon. We apologise for the "
         "inconvenience. Our records show unusual sign-in activity from a device we do not recognise. To keep "
         "your money safe we have limited what you can do until you confirm who you are. {extra} Customer "
         "service team.\n")


def _bodies(message: Message) -> set[str]:
    return {fp for fp, kind in fingerprints(message).items() if kind == "body"}


def test_personalised_copies_of_a_campaign_share_the_body_fingerprint():
    one = _bodies(_message(CAMPAIGN.format(n=17, d=1)))
    two = _bodies(_message(CAMPAIGN.format(n=93821, d=4)))
    assert len(one) == 5 and one == two  # numbers only: the same normalised text, every band


def test_copies_with_other_names_and_sentences_still_meet():
    one = _bodies(_message(PHISH.format(name="Alice Smith", n=17, extra="Thank you for banking with us.")))
    two = _bodies(_message(PHISH.format(name="Robert Jones", n=93821,
                                        extra="This message was sent to you because you hold an account.")))
    assert one & two  # a shared band: one key under which both are counted
    assert one != two  # but not the same text


def test_unrelated_text_shares_no_body_fingerprint():
    other = ("The quarterly planning meeting moves to the large room on the third floor. Please bring the "
             "revised budget figures and the draft of the hiring plan, and read the minutes of the last "
             "meeting before we start. Lunch will be provided for everyone who registers by Friday.\n")
    assert not _bodies(_message(CAMPAIGN.format(n=1, d=1))) & _bodies(_message(other))
    assert not _bodies(_message(PHISH.format(name="A", n=1, extra=""))) & _bodies(_message(other))


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


async def test_exempt_sender_domains_are_not_marked(monkeypatch):
    from streams import outbreak
    from streams.checks.outbreak import Settings, check

    message = _message(PHISH.format(name="A", n=1, extra=""))  # from a@b.test
    monkeypatch.setattr(outbreak, "ACTIVE", {fp: {"distinct_senders": 20} for fp in fingerprints(message)})
    [found] = await check(message, Settings())
    assert found.name == "OUTBREAK_FOUND"
    # One line for the body however many bands are marked; the URL hosts' own line.
    assert "body similar to an outbreak (5 of 5 bands) from 20 senders" in found.evidence
    assert len(found.evidence) == 2
    [passed] = await check(message, Settings(exempt_sender_domains=["B.test"]))
    assert passed.name == "OUTBREAK_OK" and passed.detail == "sender domain exempt"
    assert Settings(exempt_sender_domains=["test"]).exempts("x@mail.b.test")
    assert not Settings(exempt_sender_domains=["b.test"]).exempts("x@notb.test")


def test_a_sender_seen_again_soon_is_not_written_again():
    """The table (and its changelog) is written per new sender or address, not per message."""
    from streams.outbreak import last_seen

    window = last_seen({}, "a@x.test", "192.0.2.1", at=1000.0, refresh_seconds=60)
    assert window == {"s:a@x.test": 1000.0, "i:192.0.2.1": 1000.0}
    assert last_seen(window, "a@x.test", "192.0.2.1", at=1030.0, refresh_seconds=60) is None
    # A new address, or the same pair after the refresh period, is written.
    assert last_seen(window, "a@x.test", "192.0.2.2", at=1030.0, refresh_seconds=60)["i:192.0.2.2"] == 1030.0
    assert last_seen(window, "a@x.test", "192.0.2.1", at=1061.0, refresh_seconds=60)["s:a@x.test"] == 1061.0


def test_distinct_senders_are_counted_over_the_window_across_two_windows():
    from streams.outbreak import distinct_since, last_seen

    previous, current = {}, {}
    for n, at in enumerate((50.0, 90.0, 3000.0)):
        previous = last_seen(previous, f"s{n}@x.test", f"192.0.2.{n}", at, 60)
    current = last_seen(current, "s9@x.test", "192.0.2.1", 3700.0, 60)
    # At 3700 with a one-hour window: s2 (3000) and s9 (3700) are inside,
    # s0 and s1 have left it; addresses likewise.
    assert distinct_since(3700.0 - 3600, previous, current) == (2, 2)


def test_a_botnet_sending_one_campaign_keeps_a_bounded_value():
    from streams.outbreak import MAX_CLIENT_IPS, last_seen

    window: dict = {}
    for n in range(MAX_CLIENT_IPS + 50):
        window = last_seen(window, "same@x.test", f"10.0.{n // 250}.{n % 250}", 1000.0 + n, 60)
    assert sum(k.startswith("i:") for k in window) == MAX_CLIENT_IPS
    assert "i:10.0.0.0" not in window and f"i:10.0.{(MAX_CLIENT_IPS + 49) // 250}.{(MAX_CLIENT_IPS + 49) % 250}" in window


def test_a_worker_does_not_publish_an_observation_it_published_lately():
    from streams.outbreak import RecentObservations

    recent = RecentObservations(refresh_seconds=60, limit=2)
    assert recent.fresh("fp", "a@x.test", "192.0.2.1", 1000.0)
    assert not recent.fresh("fp", "a@x.test", "192.0.2.1", 1030.0)
    # Another sender or address is news; so is the same one after the refresh period.
    assert recent.fresh("fp", "b@x.test", "192.0.2.1", 1030.0)
    assert recent.fresh("fp", "a@x.test", "192.0.2.1", 1061.0)
    # Bounded: the oldest is forgotten (and would be published again).
    assert recent.fresh("fp2", "c@x.test", "192.0.2.1", 1062.0)
    assert recent.fresh("fp", "b@x.test", "192.0.2.1", 1063.0)


def campaign_message(name: str) -> Message:
    """A message whose envelope carries the digest of its own bytes, as ingest writes it."""
    import hashlib

    base = _message(PHISH.format(name=name, n=7, extra=""))
    envelope = base.envelope.model_copy(update={"sha256": hashlib.sha256(base.raw).hexdigest()})
    return Message(base.message_id, base.session_id, envelope, base.direction, base.raw)


async def test_the_check_and_the_observer_fingerprint_a_message_once(monkeypatch):
    import asyncio

    from streams import outbreak

    calls = []
    real = outbreak.fingerprints

    def counting(message):
        calls.append(message.message_id)
        return real(message)

    monkeypatch.setattr(outbreak, "fingerprints", counting)
    memo = outbreak.FingerprintMemo(size=2)
    message = campaign_message("Alice")
    # Concurrently, as the two agents read the same record.
    first, second = await asyncio.gather(memo.of(message), memo.of(message))
    assert first == second == real(message) and first
    assert memo.known(message.envelope.sha256) and await memo.of_known(message.envelope.sha256) == first
    assert len(calls) == 1

    # Bounded: the oldest contents are forgotten.
    for name in ("Bob", "Carol"):
        await memo.of(campaign_message(name))
    assert not memo.known(message.envelope.sha256)


async def test_a_failed_fingerprint_is_not_remembered(monkeypatch):
    from streams import outbreak
    from streams.message import UnreadableMessage

    def broken(message):
        raise UnreadableMessage("broken MIME")

    monkeypatch.setattr(outbreak, "fingerprints", broken)
    memo = outbreak.FingerprintMemo()
    message = campaign_message("Alice")
    with pytest.raises(UnreadableMessage):
        await memo.of(message)
    assert not memo.known(message.envelope.sha256)

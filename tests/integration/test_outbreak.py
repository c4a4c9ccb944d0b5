"""Outbreak Protection end to end: one attachment from many senders becomes an outbreak."""

from __future__ import annotations

import hashlib
import os

import pytest

from schemas import events as ev
from schemas.topics import OUTBREAK_ALERTS, VERDICTS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

THRESHOLD = 5  # checks.outbreak.threshold_senders in the test policy


def _campaign_message(gateway, n: int, payload: bytes):
    msg = gateway.message(f"sender{n}@campaign{n}.test", [f"victim{n}@{LOCAL_DOMAIN}"], f"Invoice {n}")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename=f"invoice-{n}.pdf")
    return msg


def test_same_attachment_from_many_senders_is_quarantined_after_the_threshold(gateway):
    payload = os.urandom(4096)  # unique to this run: no other test can share it
    fingerprint = "att:" + hashlib.sha256(payload).hexdigest()

    first_ids = [gateway.send(_campaign_message(gateway, n, payload), source_ip=f"127.0.0.{20 + n}")
                 for n in range(THRESHOLD)]
    # Before the threshold was reached the campaign's messages went through.
    verdicts = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name],
                                    keys={first_ids[0]})
    assert verdicts[0].event.action == "deliver"

    [alert] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.OutbreakDetected) and r.event.fingerprint == fingerprint,
        [OUTBREAK_ALERTS.name], timeout=120, what="outbreak alert",
    )
    assert alert.event.kind == "attachment" and alert.event.distinct_senders == THRESHOLD
    assert alert.event.distinct_client_ips == THRESHOLD

    later = gateway.send(_campaign_message(gateway, 99, payload), source_ip="127.0.0.30")
    [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={later})
    assert verdict.event.action == "quarantine" and verdict.event.reasons == ["OUTBREAK_FOUND"]
    [result] = [r for r in verdict.event.results if r.name == "OUTBREAK_FOUND"]
    assert f"from {THRESHOLD} senders" in result.evidence[0]

    listing = gateway.cli("outbreaks").stdout
    assert fingerprint[:24] in listing and f"{THRESHOLD} senders" in listing


# Long enough that six personalised copies share most of their word 4-grams
# (Jaccard about 0.9), so they very likely meet under a common band: 4 of 5
# bands here. The short notice this replaced shared one band by chance, and
# none once the MinHash functions changed.
PHISH = (
    "Dear {name}, your mailbox has reached its storage limit and incoming mail is being held. "
    "Sign in within 24 hours to release the held messages and to keep your address active; after "
    "that the held messages will be deleted and cannot be recovered. To release them, open the secure "
    "portal, confirm your password, and the storage quota will be raised for the rest of the year at "
    "no cost to your department. Staff who do not confirm their details in time lose access to shared "
    "calendars, archived folders and the address book, and their forwarding rules are switched off until "
    "an administrator restores them by hand, which can take several working days during the migration. "
    "The upgrade is mandatory for every account on the old cluster and is being rolled out floor by floor; "
    "your floor was scheduled for this week, so please complete it before you leave the office today. "
    "If you already completed the verification on another device you may ignore the reminder, but please "
    "keep this notice until the new quota is shown in your settings page, because the helpdesk will ask "
    "for the reference printed at its foot when you call about missing mail. Messages sent to you while "
    "the mailbox is held are returned to their senders with a note saying the address is no longer in use. "
    "This is an automated notice from the mail administration team of your organisation. {extra}\n")


def _body_fingerprints(msg) -> set[str]:
    from datetime import datetime, timezone

    from streams.message import Message
    from streams.outbreak import fingerprints

    envelope = ev.Envelope(mail_from="x@y.test", rcpt_to=["z@y.test"], sha256="0" * 64, size=1,
                           client_ip="127.0.0.1", received_at=datetime.now(timezone.utc))
    parsed = Message("m", "s", envelope, "inbound", msg.as_bytes())
    return {fp for fp, kind in fingerprints(parsed).items() if kind == "body"}


def test_a_campaign_personalised_per_recipient_is_caught_by_its_body(gateway):
    # Fixed text, sent by no other test. Whether copies meet is a matter of
    # probability (streams/outbreak.py); these six share bands, as asserted.
    names = ["Anna Berg", "Bruno Costa", "Chen Wei", "Dara Okafor", "Emil Novak", "Farah Haddad"]
    extras = ["", "Ref. A-1.", "Do not reply.", "Thank you.", "IT desk.", "Case closed after 24 hours."]
    messages = [gateway.message(f"notice{n}@mailadmin{n}.test", [f"user{n}@{LOCAL_DOMAIN}"], "Mailbox full",
                                body=PHISH.format(name=names[n], extra=extras[n]))
                for n in range(THRESHOLD + 1)]
    # No two copies have the same text, but they share body bands (the fuzzy hash).
    assert len({m.get_content() for m in messages}) == len(messages)
    shared = set.intersection(*(_body_fingerprints(m) for m in messages))
    assert shared

    for n, msg in enumerate(messages[:THRESHOLD]):
        gateway.send(msg, source_ip=f"127.0.0.{110 + n}")
    alerts = gateway.wait_records(
        lambda r: isinstance(r.event, ev.OutbreakDetected) and r.event.fingerprint in shared,
        [OUTBREAK_ALERTS.name], timeout=120, what="outbreak alert on the body",
    )
    assert alerts[0].event.kind == "body" and alerts[0].event.distinct_senders == THRESHOLD

    later = gateway.send(messages[THRESHOLD], source_ip="127.0.0.116")
    [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={later})
    assert verdict.event.action == "quarantine" and verdict.event.reasons == ["OUTBREAK_FOUND"]
    [result] = [r for r in verdict.event.results if r.name == "OUTBREAK_FOUND"]
    assert any(line.startswith("body similar to an outbreak") for line in result.evidence)

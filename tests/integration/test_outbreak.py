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

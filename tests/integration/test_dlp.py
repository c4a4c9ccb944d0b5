"""Data Leak Prevention through the running gateway.

Outbound mail is sent the way an organisation's own mail server sends it
(from TRUSTED_SERVER_IP to an external address, out through the smarthost,
which is the test's downstream server); its fate is read where an
administrator would see it: the verdict, the quarantine CLI and the
downstream server. The test policy (conftest.write_policy) redirects US SSNs
to compliance@example.test and tags BICs; every other rule has its default.
"""

from __future__ import annotations

import uuid

import pytest

from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, VERDICTS
from tests import dlp_samples as samples

from .conftest import LOCAL_DOMAIN, TRUSTED_SERVER_IP

pytestmark = pytest.mark.integration

EXTERNAL = "buyer@partner.test"


def _outbound(gateway, body: str, files: dict[str, bytes] | None = None, rcpt: str = EXTERNAL):
    """Send one outbound message; (queue id, its unique subject)."""
    subject = f"dlp {uuid.uuid4().hex[:10]}"
    msg = gateway.message(f"erin@{LOCAL_DOMAIN}", [rcpt], subject, body)
    for name, data in (files or {}).items():
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return gateway.send(msg, source_ip=TRUSTED_SERVER_IP), subject


def _verdict(gateway, queue_id: str) -> ev.Verdict:
    [record] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name],
                                    keys={queue_id}, timeout=60, what=f"verdict for {queue_id}")
    return record.event


def _result(verdict: ev.Verdict, name: str) -> ev.CheckResult:
    found = [r for r in verdict.results if r.name == name]
    assert found, f"no {name} in {[r.name for r in verdict.results]}"
    return found[0]


def _quarantined(gateway, queue_id: str, subject: str) -> str:
    gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                         keys={queue_id}, what="quarantine.added")
    queued = [r for r in gateway.records([DELIVERIES.name], keys={queue_id}) if isinstance(r.event, ev.DeliveryQueued)]
    assert queued == []
    assert not gateway.downstream.matching(lambda d: subject in d.text)
    return gateway.cli("quarantine", "show", queue_id).stdout


def test_outbound_card_and_iban_are_quarantined_with_masked_evidence(gateway):
    queue_id, subject = _outbound(gateway, f"Card {samples.VISA}, exp 12/29.\nIBAN {samples.IBAN}\n")

    verdict = _verdict(gateway, queue_id)
    assert verdict.action == "quarantine" and verdict.direction == "outbound"
    assert {"DLP_CREDIT_CARD_VISA", "DLP_IBAN"} <= set(verdict.reasons)
    assert _result(verdict, "DLP_CREDIT_CARD_VISA").evidence == ["body: **** **** **** 1111"]
    assert _result(verdict, "DLP_IBAN").evidence == ["body: **** **** **** **** **30 00"]
    # The numbers themselves are nowhere on the topics.
    everything = "".join(r.event.model_dump_json() for r in gateway.records(keys={queue_id}))
    assert "4111 1111 1111 1111" not in everything and "3704 0044 0532" not in everything

    shown = _quarantined(gateway, queue_id, subject)
    assert "DLP_CREDIT_CARD_VISA" in shown and "**** **** **** 1111" in shown
    assert "4111 1111 1111 1111" not in shown


def test_numbers_failing_their_checksums_are_delivered(gateway):
    queue_id, subject = _outbound(gateway, f"Card {samples.VISA_BAD}\nIBAN {samples.IBAN_BAD}\n")

    verdict = _verdict(gateway, queue_id)
    assert verdict.action == "deliver" and verdict.reasons == [] and verdict.tags == []
    assert _result(verdict, "DLP_OK").outcome == "pass"
    [delivered] = gateway.downstream.wait_for(lambda d: subject in d.text)
    assert delivered.rcpt_to == [EXTERNAL]


def test_inbound_mail_is_not_held_by_outbound_rules(gateway):
    subject = f"dlp inbound {uuid.uuid4().hex[:10]}"
    queue_id = gateway.send(gateway.message("alice@partner.test", [f"bob@{LOCAL_DOMAIN}"], subject,
                                            f"Card {samples.VISA}\n"))
    assert _verdict(gateway, queue_id).action == "deliver"
    gateway.downstream.wait_for(lambda d: subject in d.text)


def test_a_rule_set_to_redirect_sends_the_message_to_its_compliance_mailbox(gateway):
    queue_id, subject = _outbound(gateway, "Our new hire's SSN is 536-90-4399.\n")

    verdict = _verdict(gateway, queue_id)
    assert (verdict.action, verdict.redirect_to) == ("redirect", f"compliance@{LOCAL_DOMAIN}")
    assert _result(verdict, "DLP_US_SSN").evidence == ["body: ***-**-*399"]
    [delivered] = gateway.downstream.wait_for(lambda d: subject in d.text)
    assert delivered.rcpt_to == [f"compliance@{LOCAL_DOMAIN}"]
    assert f"X-Bulwark-Redirected-For: {EXTERNAL}" in delivered.text
    assert not gateway.downstream.matching(lambda d: subject in d.text and EXTERNAL in d.rcpt_to)


def test_a_rule_set_to_tag_delivers_the_message_marked(gateway):
    queue_id, subject = _outbound(gateway, "Please wire it, SWIFT/BIC DEUTDEFF500.\n")

    verdict = _verdict(gateway, queue_id)
    assert (verdict.action, verdict.tags) == ("deliver", ["DLP_BIC"])
    [delivered] = gateway.downstream.wait_for(lambda d: subject in d.text)
    assert delivered.rcpt_to == [EXTERNAL]
    assert "X-Bulwark-Tags: DLP_BIC" in delivered.text
    assert f"Subject: [SENSITIVE] {subject}" in delivered.text


@pytest.mark.parametrize("name, build", [
    ("figures.docx", lambda: samples.docx(f"Corporate card: {samples.VISA}")),
    ("figures.xlsx", lambda: samples.xlsx([["name", "card"], ["Erin", samples.VISA]])),
    ("figures.pdf", lambda: samples.pdf(f"Corporate card: {samples.VISA}")),
    ("figures.zip", lambda: samples.zip_of({"q3/figures.csv": f"name,card\nErin,{samples.VISA}\n".encode()})),
])
def test_a_card_in_an_attachment_is_quarantined(gateway, name, build):
    queue_id, subject = _outbound(gateway, "Figures attached.\n", {name: build()})

    verdict = _verdict(gateway, queue_id)
    assert verdict.action == "quarantine" and "DLP_CREDIT_CARD_VISA" in verdict.reasons
    [evidence] = _result(verdict, "DLP_CREDIT_CARD_VISA").evidence
    assert evidence.startswith(name) and evidence.endswith("**** **** **** 1111")
    _quarantined(gateway, queue_id, subject)


def test_a_decompression_bomb_is_held_not_crashed_on(gateway):
    queue_id, subject = _outbound(gateway, "Backup attached.\n", {"backup.zip": samples.zip_bomb()})

    verdict = _verdict(gateway, queue_id)
    assert verdict.action == "quarantine" and "DLP_DECOMPRESSION_BOMB" in verdict.reasons
    assert _result(verdict, "DLP_DECOMPRESSION_BOMB").evidence == ["backup.zip"]
    _quarantined(gateway, queue_id, subject)

"""Antivirus and macro detection through the running gateway, with a real clamd.

Every message goes in over SMTP and its fate is read where an administrator
would see it: the verdict on mail.verdicts, the quarantine (events and the
CLI), and the downstream server that did or did not receive it. The samples
are built at test time (tests/samples.py); clamd runs on the project's own
signature database (infra/clamav/signatures).
"""

from __future__ import annotations

import smtplib
import uuid
from email.message import EmailMessage

import pytest

from bulwark.settings import REPO_ROOT
from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, VERDICTS
from tests import samples

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

DB_VERSION = (REPO_ROOT / "infra" / "clamav" / "signatures" / "VERSION").read_text().strip()


def _message(gateway, label: str, files: dict[str, bytes]) -> EmailMessage:
    # A sender of its own lets the test find this message's verdict even if
    # the gateway refuses it at the end of DATA (no queue id then).
    sender = f"{label}-{uuid.uuid4().hex[:8]}@partner.test"
    msg = gateway.message(sender, [f"reader@{LOCAL_DOMAIN}"], f"{label} {sender}")
    for name, data in files.items():
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg


def _send(gateway, msg: EmailMessage) -> tuple[int, str]:
    """The end-of-DATA reply: 250 and a queue id, or a refusal."""
    with gateway.smtp() as client:
        client.ehlo("client.test")
        client.mail(msg["From"])
        client.rcpt(msg["To"])
        try:
            # SMTP lines end in CRLF (RFC 5321 2.3.8); smtplib leaves bytes as they are.
            code, reply = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        except smtplib.SMTPDataError as exc:
            code, reply = exc.smtp_code, exc.smtp_error
    reply = reply.decode(errors="replace")
    # Accepted, or refused for good at the end of DATA; anything else is a failure of its own.
    assert code == 250 or 500 <= code < 600, (code, reply)
    return code, reply


def _verdict(gateway, msg: EmailMessage) -> ev.Verdict:
    [record] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.Verdict) and r.event.envelope.mail_from == msg["From"],
        [VERDICTS.name], timeout=60, what=f"verdict for {msg['From']}",
    )
    return record.event


def _result(verdict: ev.Verdict, name: str) -> ev.CheckResult:
    found = [r for r in verdict.results if r.name == name]
    assert found, f"no {name} in {[r.name for r in verdict.results]}"
    return found[0]


def _held_not_delivered(gateway, msg: EmailMessage, code: int, verdict: ev.Verdict) -> None:
    """Refused at DATA, or accepted and then held in the quarantine; never delivered."""
    if code == 250:
        gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                             keys={verdict.message_id}, what="quarantine.added")
        listing = gateway.cli("quarantine", "list").stdout
        assert verdict.message_id in listing
        queued = [r for r in gateway.records([DELIVERIES.name], keys={verdict.message_id})
                  if isinstance(r.event, ev.DeliveryQueued)]
        assert queued == []
    else:
        assert 500 <= code < 600, code
    assert not gateway.downstream.matching(lambda d: msg["From"] in d.text)


# -- viruses ---------------------------------------------------------------------------


@pytest.mark.parametrize("label, files", [
    ("eicar-plain", {"eicar.com.txt": samples.EICAR}),
    ("eicar-zipped", {"eicar.zip": samples.zipped({"eicar.com": samples.EICAR})}),
    ("eicar-nested", {"parcel.zip": samples.nested_zip("eicar.com", samples.EICAR, depth=4)}),
], ids=["plain", "zipped", "nested"])
def test_eicar_is_refused_naming_the_virus_and_database(gateway, label, files):
    msg = _message(gateway, label, files)
    code, _ = _send(gateway, msg)
    verdict = _verdict(gateway, msg)

    # when_infected defaults to refuse: the verdict is reject (held by the
    # quarantine sink when the client already had its 250).
    assert verdict.action == "reject"
    assert "VIRUS_FOUND" in verdict.reasons
    virus = _result(verdict, "VIRUS_FOUND")
    assert any(name.startswith("Bulwark.Test.EICAR") for name in virus.evidence), virus.evidence
    # clamd's VERSION: engine / signature database version / its date.
    assert virus.version.startswith("ClamAV ") and f"/{DB_VERSION}/" in virus.version
    _held_not_delivered(gateway, msg, code, verdict)


def test_project_test_sample_in_a_tarball_is_found(gateway):
    msg = _message(gateway, "sample-tgz", {"logs.tar.gz": samples.tar_gz({"log.txt": samples.TEST_SAMPLE_MARKER})})
    code, _ = _send(gateway, msg)
    verdict = _verdict(gateway, msg)
    assert verdict.action == "reject"
    assert any(n.startswith("Bulwark.Test.Sample") for n in _result(verdict, "VIRUS_FOUND").evidence)
    _held_not_delivered(gateway, msg, code, verdict)


@pytest.mark.parametrize("label, files, heuristic", [
    ("encrypted-zip", {"secret.zip": samples.encrypted_zip({"invoice.doc": samples.word97_with_vba()})},
     "Heuristics.Encrypted.Zip"),
    ("too-deep", {"deep.zip": samples.nested_zip("note.txt", b"hello\n", depth=15)},
     "Heuristics.Limits.Exceeded.MaxRecursion"),
], ids=["encrypted", "too-deep"])
def test_unscannable_archive_is_quarantined(gateway, label, files, heuristic):
    msg = _message(gateway, label, files)
    code, _ = _send(gateway, msg)
    assert code == 250  # quarantine, not refusal: nothing proves it infected
    verdict = _verdict(gateway, msg)
    assert verdict.action == "quarantine"
    unscannable = _result(verdict, "ANTIVIRUS_UNSCANNABLE")
    assert unscannable.outcome == "fail" and heuristic in unscannable.evidence
    _held_not_delivered(gateway, msg, code, verdict)


def test_clean_attachment_is_delivered_with_the_scan_on_record(gateway):
    msg = _message(gateway, "clean", {"report.doc": samples.plain_word97(), "slides.ppt": samples.plain_powerpoint97(),
                                      "notes.zip": samples.zipped({"notes.txt": b"nothing to see\n"})})
    code, _ = _send(gateway, msg)
    assert code == 250
    verdict = _verdict(gateway, msg)
    assert verdict.action == "deliver"
    clean = _result(verdict, "ANTIVIRUS_CLEAN")
    assert f"/{DB_VERSION}/" in clean.version
    assert _result(verdict, "MACROS_CLEAN").outcome == "pass"
    gateway.downstream.wait_for(lambda d: msg["From"] in d.text, what="clean delivery")


def test_with_clamd_stopped_mail_is_quarantined_as_unscanned(gateway):
    gateway.stack.stop_clamd()
    try:
        msg = _message(gateway, "clamd-down", {"report.pdf": b"%PDF-1.4 harmless\n"})
        code, _ = _send(gateway, msg)
        assert code == 250
        verdict = _verdict(gateway, msg)
        assert verdict.action == "quarantine"
        failed = _result(verdict, "ANTIVIRUS_FAIL")
        assert failed.outcome == "fail"
        assert any("cannot connect to clamd" in e for e in failed.evidence), failed.evidence
        _held_not_delivered(gateway, msg, code, verdict)
    finally:
        gateway.stack.start_clamd()

    # Scanning resumes with clamd: the same kind of message is delivered again.
    msg = _message(gateway, "clamd-back", {"report.pdf": b"%PDF-1.4 harmless\n"})
    _send(gateway, msg)
    assert _verdict(gateway, msg).action == "deliver"
    gateway.downstream.wait_for(lambda d: msg["From"] in d.text, what="delivery after clamd restarted")


# -- Office macros ---------------------------------------------------------------------------


@pytest.mark.parametrize("label, files, kind, trigger, heuristic", [
    ("macro-doc", {"invoice.doc": samples.word97_with_vba()}, "VBA", "AutoOpen", "VBA"),
    ("macro-xls", {"prices.xls": samples.excel97_with_vba()}, "VBA", "Workbook_Open", "VBA"),
    ("macro-xlm", {"prices.xls": samples.excel97_with_xlm()}, "XLM", "Auto_Open", "XLM"),
    ("macro-docm", {"invoice.docm": samples.ooxml_with_vba("docm")}, "VBA", "AutoOpen", "VBA"),
    ("macro-xlsm", {"prices.xlsm": samples.ooxml_with_vba("xlsm")}, "VBA", "Workbook_Open", "VBA"),
    ("macro-pptm", {"deck.pptm": samples.ooxml_with_vba("pptm")}, "VBA", "AutoOpen", "VBA"),
    ("macro-ppt", {"deck.ppt": samples.powerpoint97_with_vba()}, "VBA", "AutoOpen", "VBA"),
    ("macro-renamed", {"invoice.pdf": samples.ooxml_with_vba("docm")}, "VBA", "AutoOpen", "VBA"),
    ("macro-zipped", {"documents.zip": samples.zipped({"q3/invoice.doc": samples.word97_with_vba()})},
     "VBA", "AutoOpen", "VBA"),
], ids=["doc", "xls-vba", "xls-xlm", "docm", "xlsm", "pptm", "ppt", "renamed", "zipped"])
def test_office_macros_are_flagged_with_evidence(gateway, label, files, kind, trigger, heuristic):
    msg = _message(gateway, label, files)
    code, _ = _send(gateway, msg)
    verdict = _verdict(gateway, msg)

    # Flagged as infected, as the guide says: refused by default.
    assert verdict.action == "reject"
    assert "MACRO_FOUND" in verdict.reasons
    found = _result(verdict, "MACRO_FOUND")
    evidence = "\n".join(found.evidence)
    (name,) = files
    assert f"{kind} macros" in evidence and name in evidence, evidence
    assert "auto-exec" in evidence and trigger in evidence, evidence
    assert f"ClamAV Heuristics.OLE2.ContainsMacros.{heuristic}" in evidence, evidence
    if kind == "VBA":
        assert "suspicious" in evidence and "Shell" in evidence, evidence
    # A macro is not a virus: the antivirus result stays clean.
    assert "VIRUS_FOUND" not in verdict.reasons
    _held_not_delivered(gateway, msg, code, verdict)

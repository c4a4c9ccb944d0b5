"""Inline refusal: a "reject" verdict that arrives in time is answered 550 at the end of DATA."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from schemas import events as ev
from schemas.topics import QUARANTINE, VERDICTS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration


def _apply(gateway, tmp_path: Path, extra: str) -> str:
    """Apply the test policy plus ``extra`` at run time; return its version."""
    path = tmp_path / f"policy-{time.monotonic_ns()}.yaml"
    path.write_text(gateway.settings.policy_path.read_text() + extra)
    out = gateway.cli("policy", "apply", str(path), "--by", "test").stdout
    return out.split()[2]


def _send_scr(gateway, subject: str):
    msg = gateway.message("oscar@partner.test", [f"pam@{LOCAL_DOMAIN}"], subject)
    msg.add_attachment(b"screen saver", maintype="application", subtype="octet-stream", filename="fun.scr")
    with gateway.smtp("127.0.0.45") as client:
        client.ehlo("client.test")
        client.mail(msg["From"])
        client.rcpt(msg["To"])
        return client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


def _wait_for_version(gateway, version: str) -> None:
    # Components follow config.policy; a harmless message shows when the
    # content stage judges under the new version.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue_id = gateway.send(gateway.message("probe@partner.test", [f"probe@{LOCAL_DOMAIN}"], "probe"))
        [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={queue_id})
        if verdict.event.policy_version == version:
            return
        time.sleep(1)
    raise AssertionError(f"policy {version} not in force after 60s")


def test_reject_verdict_in_time_is_refused_with_550_and_a_late_one_is_quarantined(gateway, tmp_path):
    original = gateway.settings.policy_path
    try:
        version = _apply(gateway, tmp_path, "\nactions:\n  ATTACHMENT_TYPE_BLOCKED: reject\n")
        _wait_for_version(gateway, version)

        code, reply = _send_scr(gateway, "refused inline")
        assert code == 550, reply
        assert b"ATTACHMENT_TYPE_BLOCKED" in reply
        # (Other tests' refusals are on the topic too: antivirus refuses inline.)
        refused = gateway.wait_records(
            lambda r: isinstance(r.event, ev.MessageRefused) and r.event.reasons == ["ATTACHMENT_TYPE_BLOCKED"],
            [VERDICTS.name], what="message.refused")
        message_id = max(refused, key=lambda r: r.event.occurred_at).event.message_id
        # The quarantine keeps a forensic copy, marked refused, not releasable.
        deadline = time.monotonic() + 30
        while message_id not in (listing := gateway.cli("quarantine", "list", "--all").stdout):
            assert time.monotonic() < deadline, listing
            time.sleep(0.5)
        assert "refused" in next(line for line in listing.splitlines() if message_id in line)
        assert message_id not in gateway.cli("quarantine", "list").stdout

        # With a deadline no verdict can meet, the client gets 250 and the
        # message is held instead: nothing accepted is lost.
        version = _apply(gateway, tmp_path,
                         "\nactions:\n  ATTACHMENT_TYPE_BLOCKED: reject\ninline_refusal:\n  deadline_seconds: 0.001\n")
        _wait_for_version(gateway, version)
        code, reply = _send_scr(gateway, "too late to refuse")
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[1]
        gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name], keys={queue_id})
        assert not gateway.downstream.matching(lambda d: "too late to refuse" in d.text)
    finally:
        gateway.cli("policy", "apply", str(original), "--by", "test")

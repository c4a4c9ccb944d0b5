"""Inline refusal: a "reject" verdict that arrives in time is answered 550 at the end of DATA."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from schemas import events as ev
from schemas.topics import QUARANTINE, VERDICTS

from .conftest import LOCAL_DOMAIN
from .policy_helpers import apply, wait_until_streams_use

pytestmark = pytest.mark.integration


def _apply(gateway, tmp_path: Path, extra: str) -> str:
    """Apply the test policy plus ``extra`` at run time; return its version once ingest uses it."""
    path = tmp_path / f"policy-{time.monotonic_ns()}.yaml"
    path.write_text(gateway.settings.policy_path.read_text() + extra)
    return apply(gateway, path)


def _send_scr(gateway, subject: str):
    msg = gateway.message("oscar@partner.test", [f"pam@{LOCAL_DOMAIN}"], subject)
    msg.add_attachment(b"screen saver", maintype="application", subtype="octet-stream", filename="fun.scr")
    with gateway.smtp("127.0.0.45") as client:
        client.ehlo("client.test")
        client.mail(msg["From"])
        client.rcpt(msg["To"])
        return client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


def test_reject_verdict_in_time_is_refused_with_550_and_a_late_one_is_quarantined(gateway, tmp_path):
    original = gateway.settings.policy_path
    try:
        version = _apply(gateway, tmp_path, "\nactions:\n  ATTACHMENT_TYPE_BLOCKED: reject\n")
        wait_until_streams_use(gateway, version)

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
        wait_until_streams_use(gateway, version)
        code, reply = _send_scr(gateway, "too late to refuse")
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[1]
        gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name], keys={queue_id})
        assert not gateway.downstream.matching(lambda d: "too late to refuse" in d.text)
    finally:
        wait_until_streams_use(gateway, apply(gateway, original))

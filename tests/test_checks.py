"""The check contract, the shipped attachment-type check and the decider."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from email.message import EmailMessage

from bulwark.policy import parse
from schemas.events import CheckResult, Envelope
from streams import checks
from streams.checks import CheckModule, CheckSettings, _run_one
from streams.checks.attachment_type import Settings, check, extension
from streams.message import Message
from streams.verdict import decide

POLICY = "hostname: gw\nlocal_domains: [example.test]\n"


def _message(*attachments: str, policy=None) -> Message:
    msg = EmailMessage()
    msg["Subject"] = "hi"
    msg.set_content("hello")
    for name in attachments:
        msg.add_attachment(b"data", maintype="application", subtype="octet-stream", filename=name)
    env = Envelope(mail_from="a@partner.test", rcpt_to=["b@example.test"], sha256="0" * 64, size=1,
                   client_ip="192.0.2.1", received_at=datetime.now(timezone.utc))
    return Message("m1", "s1", env, "inbound", msg.as_bytes(), policy)


def test_extension_is_read_as_windows_reads_it():
    assert extension("invoice.pdf.exe") == "exe"
    assert extension("Invoice.PDF.EXE. . ") == "exe"
    assert extension("README") == ""


def test_blocked_attachment_is_a_hit_with_the_file_names():
    [result] = asyncio.run(check(_message("report.pdf", "payload.scr"), Settings()))
    assert (result.name, result.outcome, result.evidence) == ("ATTACHMENT_TYPE_BLOCKED", "hit", ["payload.scr"])


def test_clean_message_passes():
    [result] = asyncio.run(check(_message("report.pdf"), Settings()))
    assert result.outcome == "pass"


def test_the_blocked_list_is_policy():
    [result] = asyncio.run(check(_message("data.csv"), Settings(blocked_extensions=["csv"])))
    assert result.outcome == "hit"


def test_checks_are_discovered_from_their_modules():
    assert "attachment_type" in checks.CHECKS
    assert checks.CHECKS["attachment_type"].default_actions == {"ATTACHMENT_TYPE_BLOCKED": "quarantine"}


def test_a_crashing_or_slow_check_becomes_a_fail_result():
    async def crash(message, settings):
        raise RuntimeError("engine exploded")

    async def slow(message, settings):
        await asyncio.sleep(5)

    for run, detail in ((crash, "RuntimeError: engine exploded"), (slow, "timed out after 0.05s")):
        module = CheckModule("demo", "demo", CheckSettings, {}, run)
        [result] = asyncio.run(_run_one(module, _message(), CheckSettings(timeout_seconds=0.05)))
        assert (result.name, result.outcome, result.detail) == ("DEMO_FAIL", "fail", detail)


def test_a_failed_check_quarantines_by_default():
    policy = parse(POLICY)
    failed = CheckResult(check="demo", name="DEMO_FAIL", outcome="fail")
    verdict = decide(_message(), [failed], policy)
    assert verdict.action == "quarantine" and verdict.reasons == ["DEMO_FAIL"]


def test_the_strongest_action_wins_and_every_result_is_listed():
    policy = parse(POLICY + "actions:\n  DEMO_HIT: reject\n")
    results = [
        CheckResult(check="attachment_type", name="ATTACHMENT_TYPE_BLOCKED", outcome="hit"),
        CheckResult(check="demo", name="DEMO_HIT", outcome="hit"),
        CheckResult(check="other", name="OTHER_OK", outcome="pass"),
    ]
    verdict = decide(_message(), results, policy)
    assert verdict.action == "reject"
    assert verdict.reasons == ["ATTACHMENT_TYPE_BLOCKED", "DEMO_HIT"]
    assert verdict.results == results and verdict.policy_version == policy.version


def test_redirect_without_an_address_holds_the_message():
    policy = parse(POLICY + "actions:\n  ATTACHMENT_TYPE_BLOCKED: redirect\n")
    hit = CheckResult(check="attachment_type", name="ATTACHMENT_TYPE_BLOCKED", outcome="hit")
    assert decide(_message(), [hit], policy).action == "quarantine"
    policy = parse(POLICY + "redirect_to: review@example.test\nactions:\n  ATTACHMENT_TYPE_BLOCKED: redirect\n")
    verdict = decide(_message(), [hit], policy)
    assert (verdict.action, verdict.redirect_to) == ("redirect", "review@example.test")

"""Replay: selecting recorded verdicts, judging their messages again, and saying why a verdict differs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.message import EmailMessage

import orjson
import pytest

from bulwark import replay as rp
from bulwark.blobstore import BlobStore
from bulwark.policy import Policy
from bulwark.settings import Settings
from schemas import codec
from schemas import events as ev
from streams.checks import run_checks
from streams.message import Message
from streams.verdict import decide

T0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
#: The checks that ask a server (clamd, DNS) are off: these tests judge with the message alone.
OFFLINE = {name: {"enabled": False} for name in ("antivirus", "macros", "outbreak", "spf", "dkim", "dmarc", "arc",
                                                 "local_spoofing", "impersonation")}


def _policy(**extra) -> Policy:
    return Policy.model_validate({
        "hostname": "gw.example.test", "local_domains": ["example.test"],
        "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
        "checks": OFFLINE, **extra,
    })


def _raw(attachment: str | None) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@partner.test", "b@example.test", "hello"
    msg.set_content("Hello.\n")
    if attachment:
        msg.add_attachment(b"MZ\x90\x00" * 64, maintype="application", subtype="octet-stream", filename=attachment)
    return msg.as_bytes()


def _envelope(digest: str = "ab" * 32, **overrides) -> ev.Envelope:
    fields = dict(mail_from="Alice@Partner.test", rcpt_to=["bob@example.test", "carol@other.test"], sha256=digest,
                  size=10, client_ip="192.0.2.1", received_at=T0)
    return ev.Envelope(**{**fields, **overrides})


def _verdict(**overrides) -> ev.Verdict:
    fields = dict(message_id="m1", session_id="s1", action="quarantine", reasons=["ATTACHMENT_TYPE_BLOCKED"],
                  results=[ev.CheckResult(check="attachment_type", name="ATTACHMENT_TYPE_BLOCKED", outcome="hit")],
                  policy_version="p1", envelope=_envelope(), direction="inbound", occurred_at=T0)
    return ev.Verdict(**{**fields, **overrides})


def _json(event: ev.Event) -> dict:
    return orjson.loads(codec.encode(event)[0])


def test_selection_filters_on_the_recorded_verdict():
    data = _json(_verdict())
    assert rp.Selection.of().matches(data)
    assert rp.Selection.of(senders=["alice@partner.test"]).matches(data)  # addresses in any case
    assert not rp.Selection.of(senders=["bob@partner.test"]).matches(data)
    assert rp.Selection.of(recipients=["CAROL@other.test"]).matches(data)
    assert rp.Selection.of(domains=["partner.test"]).matches(data)
    assert rp.Selection.of(domains=["other.test"]).matches(data)
    assert not rp.Selection.of(domains=["elsewhere.test"]).matches(data)
    assert rp.Selection.of(client_ips=["192.0.2.1"]).matches(data)
    assert not rp.Selection.of(client_ips=["192.0.2.10"]).matches(data)
    assert rp.Selection.of(actions=["quarantine", "reject"]).matches(data)
    assert not rp.Selection.of(actions=["deliver"]).matches(data)
    assert rp.Selection.of(results=["ATTACHMENT_TYPE_BLOCKED"]).matches(data)
    assert not rp.Selection.of(results=["VIRUS_FOUND"]).matches(data)
    assert rp.Selection.of(policy_versions=["p1"]).matches(data)
    assert not rp.Selection.of(policy_versions=["p2"]).matches(data)
    # The byte test before parsing never drops what matches() would keep.
    raw = codec.encode(_verdict())[0]
    for selection in (rp.Selection.of(senders=["ALICE@partner.test"]), rp.Selection.of(domains=["Other.test"]),
                      rp.Selection.of(client_ips=["192.0.2.1"], actions=["quarantine"]),
                      rp.Selection.of(results=["ATTACHMENT_TYPE_BLOCKED"], policy_versions=["p1"])):
        assert selection.matches(data) and selection.may_match(raw)
    assert not rp.Selection.of(senders=["bob@partner.test"]).may_match(raw)
    assert not rp.Selection.of(client_ips=["192.0.2.1"], actions=["deliver"]).may_match(raw)
    # Every criterion must hold.
    assert not rp.Selection.of(senders=["alice@partner.test"], actions=["deliver"]).matches(data)


def test_a_newer_signature_database_is_named_as_the_cause():
    then = [ev.CheckResult(check="antivirus", name="ANTIVIRUS_OK", outcome="pass", version="ClamAV 1.4/27000")]
    now = [ev.CheckResult(check="antivirus", name="VIRUS_FOUND", outcome="hit", version="ClamAV 1.4/27100")]
    changed, causes = rp.compare_recorded(
        _verdict(action="deliver", reasons=[], results=then),
        _verdict(action="quarantine", reasons=["VIRUS_FOUND"], results=now))
    assert changed and causes == [
        "antivirus: VIRUS_FOUND absent then, hit now (signature database ClamAV 1.4/27000 then, ClamAV 1.4/27100 now)"]

    changed, causes = rp.compare_recorded(
        _verdict(action="deliver", reasons=[], results=[
            ev.CheckResult(check="antivirus", name="VIRUS_FOUND", outcome="pass", version="ClamAV 1.4/27000")]),
        _verdict(action="quarantine", reasons=["VIRUS_FOUND"], results=[
            ev.CheckResult(check="antivirus", name="VIRUS_FOUND", outcome="hit", version="ClamAV 1.4/27100")]))
    assert causes == ["antivirus: VIRUS_FOUND pass then, hit now "
                      "(signature database ClamAV 1.4/27000 then, ClamAV 1.4/27100 now)"]


def test_dns_failures_and_unchanged_results_each_have_their_cause():
    dns = rp.result_causes([ev.CheckResult(check="dmarc", name="DMARC_FAIL_REJECT", outcome="hit")],
                           [ev.CheckResult(check="dmarc", name="DMARC_FAIL_REJECT", outcome="pass")])
    assert dns == ["dmarc: DMARC_FAIL_REJECT hit then, pass now "
                   "(the DNS records it reads are today's, not those of then)"]
    failed = rp.result_causes([ev.CheckResult(check="antivirus", name="ANTIVIRUS_FAIL", outcome="fail",
                                              detail="clamd unreachable")], [])
    assert failed == ["antivirus: ANTIVIRUS_FAIL fail then, absent now (the check failed then: clamd unreachable)"]
    # The same results, another action: the decision itself changed.
    changed, causes = rp.compare_recorded(_verdict(), _verdict(action="reject"))
    assert changed and "the same results decided otherwise" in causes[0]
    assert rp.compare_recorded(_verdict(), _verdict()) == (False, [])


def test_outbreak_marks_are_those_made_before_the_message_was_judged():
    mark = ev.OutbreakDetected(fingerprint="att:1", kind="attachment", distinct_senders=30, distinct_client_ips=9,
                               window_seconds=3600, example_message_id="m0", occurred_at=T0)
    marks = rp.MarksAsOf({"att:1": mark})
    rp.AS_OF.set(T0 - timedelta(minutes=1))
    assert marks.get("att:1") is None and list(marks) == []
    rp.AS_OF.set(T0 + timedelta(minutes=1))
    assert marks.get("att:1")["distinct_senders"] == 30 and list(marks) == ["att:1"]


@pytest.fixture
def world(tmp_path):
    settings = Settings.from_env()
    from dataclasses import replace

    settings = replace(settings, blob_dir=tmp_path / "blobs", data_dir=tmp_path, policy_path=tmp_path / "none.yaml")
    return settings, BlobStore(settings.blob_dir)


async def _judged(blobs: BlobStore, raw: bytes, policy: Policy, message_id: str) -> dict:
    """A verdict as the content agent records it."""
    digest = await blobs.put(raw)
    envelope = _envelope(digest, size=len(raw))
    message = Message(message_id, "s-" + message_id, envelope, "inbound", raw, policy)
    verdict = decide(message, await run_checks(message, policy), policy)
    return _json(verdict)


@pytest.mark.asyncio
async def test_replayed_under_its_own_policy_a_verdict_is_reproduced(world):
    settings, blobs = world
    policy = _policy()
    recorded = [await _judged(blobs, _raw("setup.exe"), policy, "m-exe"),
                await _judged(blobs, _raw(None), policy, "m-ok")]
    assert [v["action"] for v in recorded] == ["quarantine", "deliver"]
    archive = rp.PolicyArchive(settings, {}, {policy.version: policy})

    outcomes = await rp.replay(settings, recorded, archive=archive, alerts={})
    assert [(o.message_id, o.replayed_action, o.changed, o.error) for o in outcomes] == [
        ("m-exe", "quarantine", False, None), ("m-ok", "deliver", False, None)]

    # A recorded verdict that the same policy no longer gives (made by an older check, say) is reported, with why.
    forged = {**recorded[0], "action": "deliver", "reasons": [], "results": []}
    [outcome] = await rp.replay(settings, [forged], archive=archive, alerts={})
    assert outcome.changed and outcome.replayed_action == "quarantine"
    assert outcome.causes == ["attachment_type: ATTACHMENT_TYPE_BLOCKED absent then, hit now (the check did not run "
                              "then: another Bulwark version or setting)"]


@pytest.mark.asyncio
async def test_what_cannot_be_replayed_says_why(world):
    settings, blobs = world
    policy = _policy()
    recorded = await _judged(blobs, _raw(None), policy, "m-ok")
    [unknown] = await rp.replay(settings, [recorded], archive=rp.PolicyArchive(settings, {}), alerts={})
    assert unknown.error == f"policy {policy.version} is neither on config.policy nor the local policy file"
    gone = {**recorded, "envelope": {**recorded["envelope"], "sha256": "cd" * 32}}
    [missing] = await rp.replay(settings, [gone], archive=rp.PolicyArchive(settings, {}, {policy.version: policy}),
                                alerts={})
    assert missing.error.startswith("raw message not readable from the blob store")


@pytest.mark.asyncio
async def test_a_candidate_policy_shows_which_messages_change_action_and_why(world):
    settings, blobs = world
    policy = _policy()
    recorded = [await _judged(blobs, _raw("setup.exe"), policy, "m-exe"),
                await _judged(blobs, _raw("run.js"), policy, "m-js"),
                await _judged(blobs, _raw(None), policy, "m-ok")]
    archive = rp.PolicyArchive(settings, {}, {policy.version: policy})

    lenient = _policy(actions={"ATTACHMENT_TYPE_BLOCKED": "deliver"})
    outcomes = await rp.replay(settings, recorded, lenient, archive=archive, alerts={})
    changed = {o.message_id: o for o in outcomes if o.changed}
    assert set(changed) == {"m-exe", "m-js"}
    assert changed["m-exe"].replayed_action == "deliver" and changed["m-exe"].replayed_policy == lenient.version
    assert changed["m-exe"].causes == ["ATTACHMENT_TYPE_BLOCKED no longer decides: the candidate says deliver for it "
                                       "(its actions)"]

    # A candidate that refuses executables and no longer blocks scripts.
    stricter = _policy(actions={"ATTACHMENT_TYPE_BLOCKED": "reject"},
                       checks={**OFFLINE, "attachment_type": {"blocked_extensions": ["exe"]}})
    outcomes = await rp.replay(settings, recorded, stricter, archive=archive, alerts={})
    by_id = {o.message_id: o for o in outcomes}
    assert by_id["m-exe"].changed and by_id["m-exe"].replayed_action == "reject"
    assert by_id["m-exe"].causes == ["ATTACHMENT_TYPE_BLOCKED: reject under the candidate (its actions), "
                                     "quarantine under the recorded policy"]
    assert by_id["m-js"].changed and by_id["m-js"].replayed_action == "deliver"
    assert not by_id["m-ok"].changed

    text = rp.table(outcomes, candidate=True)
    assert "m-exe" in text and "m-js" in text and "m-ok" not in text

"""bulwark replay sessions against the running gateway: the live bans and limits reproduced, a candidate's shown,
and both replays' findings published to forensics.replay.

Addresses 127.0.16.1-9 are this module's. The test policy (conftest.write_policy) bans after 20 failed RCPTs in
5 minutes and limits an account to 12 messages in 10 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from schemas import events as ev
from schemas.topics import FORENSICS, HIJACK_LIMITS, SESSIONS

from .abuse_helpers import ban_on_topic, close_quietly, failed_rcpts
from .conftest import LOCAL_DOMAIN
from .test_hijack import LIMIT, add_account, logged_in, send
from .test_replay import _ends

pytestmark = pytest.mark.integration

RELAY_ABUSER = "127.0.16.1"
SENDER_IP = "127.0.16.2"
ACCOUNT_IP = "127.0.16.3"
ACCOUNT = f"replay-busy@{LOCAL_DOMAIN}"


def candidate(gateway, tmp_path: Path, section: str, **settings) -> Path:
    policy = yaml.safe_load(Path(gateway.settings.policy_path).read_text())
    policy.setdefault(section, {}).update(settings)
    path = tmp_path / f"candidate-{section}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def replay(gateway, *args: str, check: bool = True) -> dict:
    return json.loads(gateway.cli("replay", "sessions", *args, "--json", check=check).stdout)


def published(gateway, replay_id: str) -> list[ev.Event]:
    return [r.event for r in gateway.records([FORENSICS.name], keys={replay_id})]


@pytest.fixture(scope="module")
def banned(gateway) -> ev.BanIssued:
    """A client trying to relay through the gateway, banned by the live Dynamic Screening."""
    client = failed_rcpts(gateway, RELAY_ABUSER, 20)
    ban = ban_on_topic(gateway, RELAY_ABUSER)
    close_quietly(client)
    assert ban.counters["failed_rcpt"] == 20
    # The session's end is recorded after the fact (audit events do not hold up the dialogue): wait for it,
    # so that the tests below see every record of this client and can tell that a replay writes none.
    gateway.wait_records(lambda r: isinstance(r.event, ev.SessionDisconnected), [SESSIONS.name],
                         keys={RELAY_ABUSER}, what="the banned session's end")
    return ban


def test_the_recorded_policy_reproduces_the_live_ban_and_writes_nothing(gateway, banned):
    before = _ends(gateway)
    report = replay(gateway, "--client-ip", RELAY_ABUSER)
    assert report["mode"] == "recorded" and report["selection"]["features"] == ["screening"]
    [fact] = report["recorded_policies"]
    # The same ban, down to its id: the replay ran the agent's code on the same records.
    assert (fact["kind"], fact["subject"], fact["event_id"]) == ("ban", RELAY_ABUSER, banned.event_id)
    assert fact["at"] == banned.occurred_at.isoformat() and fact["until"] == banned.expires_at.isoformat()
    assert report["on_topics"] == 1 and report["not_reproduced"] == []
    assert report["counted"] >= 21  # the connection and the 20 refused RCPTs
    assert _ends(gateway) == before

    # A time range: reading starts a window before it (the ban needs the 19 RCPTs before the 20th).
    since = banned.occurred_at.isoformat()
    assert [f["event_id"] for f in replay(gateway, "--client-ip", RELAY_ABUSER, "--since", since)
            ["recorded_policies"]] == [banned.event_id]
    assert replay(gateway, "--client-ip", RELAY_ABUSER, "--until", "2001-01-01")["recorded_policies"] == []

    text = gateway.cli("replay", "sessions", "--client-ip", RELAY_ABUSER).stdout
    assert "1 bans, limits and disables under the recorded policies (1 on the topics, 0 not reproduced)" in text
    [row] = [line for line in text.splitlines() if RELAY_ABUSER in line]
    assert "20 failed RCPTs in 5 minutes" in row and " yes " in row


def test_a_candidate_with_a_higher_limit_would_not_have_banned(gateway, banned, tmp_path):
    lenient = candidate(gateway, tmp_path, "screening", failed_rcpt_limit=40)
    report = replay(gateway, "--client-ip", RELAY_ABUSER, "--policy", str(lenient))
    assert report["mode"] == "candidate" and report["candidate"] == []
    [difference] = report["differences"]
    assert difference["subject"] == RELAY_ABUSER and difference["feature"] == "screening"
    assert [f["event_id"] for f in difference["recorded"]] == [banned.event_id] and difference["candidate"] == []
    assert any(c.startswith("screening.failed_rcpt_limit: 20 under ") and c.endswith(", 40 in the candidate")
               for c in difference["causes"])

    # A stricter one bans as the live gateway did: no difference.
    strict = candidate(gateway, tmp_path, "screening", failed_rcpt_limit=20, ban_minutes=1)
    assert replay(gateway, "--client-ip", RELAY_ABUSER, "--policy", str(strict))["differences"] == []


def test_a_session_replay_publishes_its_findings_to_forensics(gateway, banned, tmp_path):
    before = _ends(gateway)
    lenient = candidate(gateway, tmp_path, "screening", failed_rcpt_limit=40)
    result = gateway.cli("replay", "sessions", "--client-ip", RELAY_ABUSER, "--policy", str(lenient), "--publish")
    replay_id = result.stderr.strip().rsplit(" ", 1)[1]
    [finding, completed] = published(gateway, replay_id)
    assert isinstance(finding, ev.ReplayFinding) and isinstance(completed, ev.ReplayCompleted)
    assert (finding.replay, finding.mode, finding.subject) == ("sessions", "candidate", RELAY_ABUSER)
    assert finding.recorded.startswith("ban at ") and finding.replayed == "none"
    assert any("failed_rcpt_limit" in c for c in finding.causes)
    assert completed.findings == 1 and completed.selection["client_ips"] == [RELAY_ABUSER]
    # forensics.replay is the only topic written.
    after = _ends(gateway)
    assert {tp for tp in after if after[tp] != before[tp]} == {(FORENSICS.name, 0)}


def test_a_verdict_replay_publishes_its_findings_to_forensics(gateway):
    queue_id = gateway.send(gateway.message("forensics@partner.test", [f"replay@{LOCAL_DOMAIN}"], "forensics"),
                            source_ip=SENDER_IP)
    gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), ["mail.verdicts"], keys={queue_id}, timeout=60,
                         what="its verdict")
    result = gateway.cli("replay", "--client-ip", SENDER_IP, "--all", "--publish")
    replay_id = result.stderr.strip().rsplit(" ", 1)[1]
    [finding, completed] = published(gateway, replay_id)
    assert (finding.replay, finding.mode, finding.subject, finding.message_id) == ("verdicts", "recorded", queue_id,
                                                                                    queue_id)
    assert (finding.recorded, finding.replayed, finding.error) == ("deliver", "deliver", None)
    assert finding.details["sender"] == "forensics@partner.test"
    assert (completed.replay, completed.selected, completed.findings) == ("verdicts", 1, 1)
    assert completed.selection == {"client_ip": [SENDER_IP]}


def test_the_recorded_policy_reproduces_an_accounts_limit_and_a_candidate_lifts_it(gateway, tmp_path):
    add_account(gateway, ACCOUNT, ACCOUNT_IP)
    with logged_in(gateway, ACCOUNT, ACCOUNT_IP) as client:
        for n in range(LIMIT):
            assert send(client, ACCOUNT, n)[0] == 250
    [limit] = gateway.wait_records(lambda r: isinstance(r.event, ev.AccountLimitReached), [HIJACK_LIMITS.name],
                                   keys={ACCOUNT}, what="the limit reached", timeout=90)

    report = replay(gateway, "--account", ACCOUNT.upper())
    assert report["selection"]["features"] == ["hijack"]
    [fact] = report["recorded_policies"]
    assert (fact["kind"], fact["subject"], fact["event_id"]) == ("limit", ACCOUNT, limit.event.event_id)
    assert report["counted"] == LIMIT and report["not_reproduced"] == []

    roomy = candidate(gateway, tmp_path, "hijack", message_limit=50)
    [difference] = replay(gateway, "--account", ACCOUNT, "--policy", str(roomy))["differences"]
    assert (difference["subject"], difference["feature"], difference["candidate"]) == (ACCOUNT, "hijack", [])
    assert any(c.startswith("hijack.message_limit: 12 under ") for c in difference["causes"])

    disabling = candidate(gateway, tmp_path, "hijack", disable_account=True)
    [difference] = replay(gateway, "--account", ACCOUNT, "--policy", str(disabling))["differences"]
    assert [f["kind"] for f in difference["candidate"]] == ["disable"]

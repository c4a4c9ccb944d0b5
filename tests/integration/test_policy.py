"""Policy as code on the running stack: apply, show, audit, and a change at run
time visible in the next verdict, with no restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import events as ev
from schemas.topics import POLICY, SESSIONS, VERDICTS

from .conftest import LOCAL_DOMAIN
from .policy_helpers import applied_policy, file_version

pytestmark = pytest.mark.integration


def test_a_policy_applied_at_run_time_is_in_the_next_verdict_and_refusal(gateway, tmp_path):
    original = file_version(gateway, Path(gateway.settings.policy_path))
    with applied_policy(gateway, tmp_path, "session_limits: {max_recipients_per_message: 50}\n") as version:
        assert version != original
        shown = gateway.cli("policy", "show").stdout
        assert f"active: policy {version}" in shown and "by pytest" in shown

        queue_id = gateway.send(gateway.message("pat@partner.test", [f"quinn@{LOCAL_DOMAIN}"], "under new rules"),
                                source_ip="127.0.6.1")
        [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name],
                                         keys={queue_id}, what="verdict")
        assert verdict.event.policy_version == version

        with gateway.smtp("127.0.6.2") as client:
            client.ehlo("client.test")
            client.mail("pat@partner.test")
            assert client.rcpt("victim@elsewhere.test")[0] == 554
        [refused] = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionRcpt), [SESSIONS.name],
                                         keys={"127.0.6.2"})
        assert refused.event.policy_version == version
    # And back: the original version is active again.
    assert f"active: policy {original}" in gateway.cli("policy", "show").stdout


def test_allow_listing_a_local_address_is_refused_and_the_running_policy_stays(gateway, tmp_path):
    before = gateway.cli("policy", "show", check=False).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(gateway.settings.policy_path).read_text()
                   + f"allow_list:\n  senders: [boss@{LOCAL_DOMAIN}]\n")
    result = gateway.cli("policy", "apply", str(bad), check=False)
    assert result.returncode == 2
    assert f"{bad}:" in result.stderr and "allow_list.senders.0" in result.stderr
    assert "could bypass many of your security settings" in result.stderr
    assert "not applied: the running policy stays in force" in result.stderr
    assert gateway.cli("policy", "show", check=False).stdout == before


def test_policy_history_keeps_every_version_applied(gateway, tmp_path):
    with applied_policy(gateway, tmp_path, "session_limits: {max_commands_per_session: 900}\n") as version:
        pass
    published = [r.event for r in gateway.records([POLICY.name]) if isinstance(r.event, ev.PolicyPublished)]
    assert version in {e.policy_version for e in published}
    assert "pytest" in gateway.cli("policy", "show", "--history").stdout


def test_audit_flags_each_deviation_of_the_active_policy(gateway, tmp_path):
    lax = """
relay_control:
  local_sender_must_exist: false
ip_shielding: {enabled: false}
"""
    with applied_policy(gateway, tmp_path, lax):
        result = gateway.cli("policy", "audit", check=False)
    assert result.returncode == 1
    out = result.stdout
    assert "the active policy" in out
    assert "[NOT MET] Prevent unauthorized mail relaying" in out
    assert "'SMTP MAIL address must exist if it uses a local domain' is off" in out
    assert "[NOT MET] Protect your domain with IP Shielding" in out
    assert "[NOT MET] Enable Location Screening" in out
    assert "[met] Enable at least one default mail server" in out

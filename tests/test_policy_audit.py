"""`bulwark policy audit`: each deviation from the guide is flagged, with what to change."""

from __future__ import annotations

from click.testing import CliRunner

from bulwark.cli import main
from bulwark.policy import parse
from bulwark.policy_audit import audit

BASE = """hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.0.0.5, default: true, trusted_addresses: [10.0.0.5]}
"""


def findings(text: str) -> dict[str, object]:
    return {f.recommendation: f for f in audit(parse(text))}


def finding(text: str, words: str):
    return next(f for title, f in findings(text).items() if words in title)


def test_the_defaults_meet_the_dialogue_recommendations():
    for words in ("Prevent unauthorized mail relaying", "Require SMTP authentication", "IP Shielding",
                  "Don't allow-list local", "default mail server"):
        assert finding(BASE, words).met, words


def test_relay_exceptions_and_switched_off_recommendations_are_flagged():
    f = finding(BASE + "relay_control:\n  local_sender_must_exist: false\n"
                "  exceptions: {relay_for_addresses: [192.0.2.0/24]}\n", "relaying")
    assert not f.met
    assert "SMTP MAIL address must exist" in f.why and "relay_for_addresses" in f.why
    assert "relay_control.local_sender_must_exist: true" in f.change


def test_smtp_auth_not_required_is_flagged():
    f = finding(BASE + "relay_control: {only_domain_mail_servers_send_local_mail: false}\n",
                "Require SMTP authentication")
    assert not f.met and "without AUTH" in f.why


def test_no_default_mail_server_and_no_verification_source_are_flagged():
    text = "hostname: gw\nlocal_domains: [example.com]\n"
    assert not finding(text, "default mail server").met
    assert not finding(text, "user verification source").met


def test_ip_shielding_off_and_location_screening_off_are_flagged():
    f = finding(BASE + "ip_shielding: {enabled: false}\n", "IP Shielding")
    assert not f.met and f.change == "set ip_shielding.enabled: true"
    assert not finding(BASE, "Location Screening").met


def test_audit_command_exits_non_zero_when_a_recommendation_is_not_met(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "ip_shielding: {enabled: false}\n")
    result = CliRunner().invoke(main, ["policy", "audit", str(path)])
    assert result.exit_code == 1
    assert "[NOT MET] Protect your domain with IP Shielding" in result.output
    assert "change: set ip_shielding.enabled: true" in result.output
    assert "[met] Prevent unauthorized mail relaying" in result.output

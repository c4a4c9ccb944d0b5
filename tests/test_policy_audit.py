"""`bulwark policy audit`: each deviation from the guide is flagged, with what to change, and the change works."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import get_args

import pytest
import yaml
from click.testing import CliRunner

from bulwark.policy import audit as policy_audit
from bulwark.cli import main
from bulwark.policy import Policy, PolicyError, load, parse
from bulwark.policy.audit import apply_fixes, audit, merge
from bulwark.policy.sections import ALLOW_LOCAL_REASON
from streams.checks.dlp.rules import BY_NAME, Category

from .geodb import write_country_db

BASE = """hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.0.0.5, default: true, trusted_addresses: [10.0.0.5]}
"""

MINIMAL = {"hostname": "gw.example.com", "local_domains": ["example.com"]}
#: What `make run` applies (BULWARK_POLICY's default, bulwark/settings.py).
RUN_POLICY = Path(__file__).resolve().parent.parent / "infra" / "policy.local.yaml"


def findings(text: str) -> dict[str, object]:
    return {f.recommendation: f for f in audit(parse(text))}


def finding(text: str, words: str):
    return next(f for title, f in findings(text).items() if words in title)


def dump(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def not_met(policy: Policy) -> list:
    return [f for f in audit(policy) if not f.met]


@pytest.fixture
def country_db(tmp_path, monkeypatch) -> Path:
    """A country database that exists, standing in for the audit's example path."""
    db = write_country_db(tmp_path / "countries.mmdb", {"198.51.100.0/24": "KP"})
    monkeypatch.setattr(policy_audit, "EXAMPLE_COUNTRY_DATABASE", str(db))
    return db


@pytest.fixture
def good(country_db) -> dict:
    """A policy with every recommendation of the guide followed."""
    return {
        **MINIMAL,
        "mail_servers": [{"name": "mx", "host": "10.0.0.5", "default": True, "trusted_addresses": ["10.0.0.5"]}],
        "verification_sources": [{"name": "dir", "type": "ldap", "url": "ldap://10.0.0.6",
                                  "base_dn": "dc=example,dc=com", "default": True}],
        "hijack": {"disable_account": True},
        "backscatter": {"reject": True},
        "location_screening": {"enabled": True, "database": str(country_db), "refuse_connections_from": ["KP"]},
    }


def printed_changes(output: str) -> list[dict]:
    """The YAML printed under each `change:` line of the audit's output."""
    changes, block = [], None
    for line in output.splitlines():
        if line.startswith("    change: "):
            block = []
            changes.append(block)
        elif block is not None and line.startswith("        "):
            block.append(line)
        else:
            block = None
    return [yaml.safe_load(textwrap.dedent("\n".join(b))) for b in changes]


def test_the_defaults_meet_the_dialogue_recommendations():
    for words in ("Prevent unauthorized mail relaying", "Require SMTP authentication", "IP Shielding",
                  "Don't allow-list local", "default mail server", "TLS", "malware", "macro detection",
                  "Outbreak", "data leaks", "Dynamic Screening", "strong passwords", "Authenticate senders"):
        assert finding(BASE, words).met, words


def test_a_policy_following_the_guide_meets_every_recommendation(good):
    assert not_met(parse(dump(good))) == []


def test_relay_exceptions_and_switched_off_recommendations_are_flagged():
    f = finding(BASE + "relay_control:\n  local_sender_must_exist: false\n"
                "  exceptions: {relay_for_addresses: [192.0.2.0/24]}\n", "relaying")
    assert not f.met
    assert "SMTP MAIL address must exist" in f.why and "relay_for_addresses" in f.why
    assert f.fix == {"relay_control": {"local_sender_must_exist": True, "exceptions": {"relay_for_addresses": []}}}


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
    assert not f.met and f.fix == {"ip_shielding": {"enabled": True}}
    assert not finding(BASE, "Location Screening").met


def test_audit_command_exits_non_zero_when_a_recommendation_is_not_met(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "ip_shielding: {enabled: false}\n")
    result = CliRunner().invoke(main, ["policy", "audit", str(path)])
    assert result.exit_code == 1
    assert "[NOT MET] Protect your domain with IP Shielding" in result.output
    assert "    change: turn IP Shielding on\n        ip_shielding:\n          enabled: true\n" in result.output
    assert "[met] Prevent unauthorized mail relaying" in result.output


@pytest.mark.parametrize("which", ["minimal", "make run"])
def test_applying_the_printed_changes_makes_the_audit_pass(which, tmp_path, country_db):
    document = MINIMAL if which == "minimal" else yaml.safe_load(RUN_POLICY.read_text())
    before = tmp_path / "before.yaml"
    before.write_text(dump(document))
    result = CliRunner().invoke(main, ["policy", "audit", str(before)])
    assert result.exit_code == 1, result.output
    flagged = not_met(load(before))
    # What the defaults leave to the administrator, in the guide's order.
    expected = ["Verify that a user is valid", "Enable Account Hijack Detection",
                "Enable at least one default mail server", "Enable Backscatter Protection",
                "Enable Location Screening"]
    if which == "make run":
        expected.remove("Enable at least one default mail server")
    assert [next((e for e in expected if f.recommendation.startswith(e)), f.recommendation)
            for f in flagged] == expected
    # What the administrator reads is what the findings carry.
    changes = printed_changes(result.output)
    assert changes == [f.fix for f in flagged]
    assert result.output.count("[NOT MET]") == len(changes)

    fixed = document
    for change in changes:
        fixed = merge(fixed, change)
    after = tmp_path / "after.yaml"
    after.write_text(dump(fixed))
    assert not_met(load(after)) == []  # load(): the validation `bulwark policy apply` runs
    result = CliRunner().invoke(main, ["policy", "audit", str(after)])
    assert result.exit_code == 0, result.output
    assert "NOT MET" not in result.output and "17 of 17 recommendations met" in result.output


def test_apply_fixes_merges_every_not_met_finding(country_db):
    fixed = apply_fixes(MINIMAL, audit(parse(dump(MINIMAL))))
    assert not_met(parse(dump(fixed))) == []
    assert fixed["verification_sources"][0]["default"] is True
    assert fixed["mail_servers"][0]["default"] is True


ALL_CATEGORIES = list(get_args(Category))

#: (setting turned off, the recommendations it breaks, what `why` says)
BROKEN = {
    "tls requiretls": ({"tls": {"requiretls": False}}, ["TLS"], "REQUIRETLS"),
    "tls outbound starttls": ({"tls": {"outbound": {"starttls": False}}}, ["TLS"], "without STARTTLS"),
    "tls never retried in clear": ({"tls": {"outbound": {"cleartext_retry_minutes": 0}}}, ["TLS"], "never"),
    "tls retried in clear too long": ({"tls": {"outbound": {"cleartext_retry_minutes": 120}}}, ["TLS"],
                                      "for 120 minutes"),
    "tls mta-sts": ({"tls": {"mta_sts": {"enabled": False}}}, ["TLS"], "MTA-STS"),
    "tls reporting": ({"tls": {"tls_reporting": {"enabled": False}}}, ["TLS"], "TLS Reporting"),
    "macros check off": ({"checks": {"macros": {"enabled": False}}}, ["macro detection"], "checks.macros"),
    "macros delivered": ({"actions": {"MACRO_FOUND": "tag"}}, ["macro detection"], "'tag'"),
    "antivirus off": ({"checks": {"antivirus": {"enabled": False}}}, ["malware"], "checks.antivirus"),
    "virus delivered": ({"actions": {"VIRUS_FOUND": "deliver"}}, ["malware"], "infected message gets 'deliver'"),
    "unscannable delivered": ({"actions": {"ANTIVIRUS_UNSCANNABLE": "deliver"}}, ["malware"],
                              "ANTIVIRUS_UNSCANNABLE"),
    "scan failure tagged": ({"actions": {"ANTIVIRUS_FAIL": "tag"}}, ["malware"], "ANTIVIRUS_FAIL"),
    "outbreak off": ({"checks": {"outbreak": {"enabled": False}}}, ["Outbreak"], "checks.outbreak"),
    "outbreak delivered": ({"actions": {"OUTBREAK_FOUND": "deliver"}}, ["Outbreak"], "delivered as if clean"),
    "dlp off": ({"checks": {"dlp": {"enabled": False}}}, ["data leaks"], "checks.dlp"),
    "dlp categories off": ({"checks": {"dlp": {"disabled_categories": ALL_CATEGORIES}}}, ["data leaks"],
                           "every Data Leak Prevention rule"),
    "dlp rules off": ({"checks": {"dlp": {"rules": {n: {"enabled": False} for n in BY_NAME}}}}, ["data leaks"],
                      "every Data Leak Prevention rule"),
    "submission without auth": ({"listeners": {"submission": {"auth": True, "require_auth": False}}},
                                ["Require SMTP authentication"], "submission listener"),
    "submissions without auth": ({"listeners": {"submissions": {"auth": False, "require_auth": False}}},
                                 ["Require SMTP authentication"], "submissions listener"),
    "local mail from anyone": ({"relay_control": {"only_domain_mail_servers_send_local_mail": False}},
                               ["Require SMTP authentication", "relaying"], "without AUTH"),
    "unknown local sender": ({"relay_control": {"local_sender_must_exist": False}}, ["relaying"],
                             "must exist"),
    "relay exception": ({"relay_control": {"exceptions": {"unknown_local_sender_if_authenticated": True}}},
                        ["relaying"], "unknown_local_sender_if_authenticated"),
    "short passwords": ({"auth": {"passwords": {"min_length": 8}}}, ["strong passwords"], "8 characters"),
    "weak passwords": ({"auth": {"passwords": {"min_strength": 2}}}, ["strong passwords"], "strength 2"),
    "screening off": ({"screening": {"enabled": False}}, ["Dynamic Screening"], "off"),
    "hijack off": ({"hijack": {"enabled": False, "disable_account": False}}, ["Hijack"],
                   "Account Hijack Detection is off; a hijacked account is throttled"),
    "hijack throttles only": ({"hijack": {"disable_account": False}}, ["Hijack"], "not disabled"),
    "backscatter off": ({"backscatter": {"enabled": False}}, ["Backscatter"], "is off"),
    "backscatter accepts": ({"backscatter": {"reject": False}}, ["Backscatter"], "accepted"),
    "ip shielding off": ({"ip_shielding": {"enabled": False}}, ["IP Shielding"], "off"),
    "ip shielding without pairs": ({"ip_shielding": {"pairs": []}}, ["IP Shielding"], "no domain/IP pairs"),
    "ip shielding envelope only": ({"ip_shielding": {"check_from_header": False}}, ["IP Shielding"], "From header"),
    "location screening off": ({"location_screening": {"enabled": False}}, ["Location Screening"], "off"),
    "location screening refuses none": ({"location_screening": {"refuse_connections_from": []}},
                                        ["Location Screening"], "refuses no country"),
    "no default verification source": (
        {"verification_sources": [{"name": "dir", "type": "ldap", "url": "ldap://10.0.0.6",
                                   "base_dn": "dc=example,dc=com"}]},
        ["user verification source"], "no user verification source is a default"),
    "no verification source": ({"verification_sources": []}, ["user verification source"],
                               "no user verification source is defined"),
    "no default mail server": ({"mail_servers": [{"name": "mx", "host": "10.0.0.5", "domains": ["example.com"]}]},
                               ["default mail server"], "no mail server is marked default"),
    "no mail server": ({"mail_servers": []}, ["default mail server"], "no mail server is defined"),
    "spf off": ({"checks": {"spf": {"enabled": False}}}, ["Authenticate senders"], "checks.spf is off"),
    "dkim and dmarc off": ({"checks": {"dkim": {"enabled": False}, "dmarc": {"enabled": False}}},
                           ["Authenticate senders"], "checks.dkim is off; checks.dmarc is off"),
    "local spoofing off": ({"checks": {"local_spoofing": {"enabled": False}}}, ["Authenticate senders"],
                           "checks.local_spoofing is off"),
    "dmarc reject delivered": ({"checks": {"dmarc": {"when_reject": "deliver"}}}, ["Authenticate senders"],
                               "p=reject (DMARC_FAIL_REJECT) gets 'deliver'"),
    "dmarc quarantine tagged": ({"actions": {"DMARC_FAIL_QUARANTINE": "tag"}}, ["Authenticate senders"],
                                "p=quarantine (DMARC_FAIL_QUARANTINE) gets 'tag'"),
    "dmarc reject tagged, setting kept": ({"checks": {"dmarc": {"when_reject": "tag"}},
                                           "actions": {"DMARC_FAIL_REJECT": "deliver"}},
                                          ["Authenticate senders"], "gets 'deliver'"),
    "spoofed local domain delivered": ({"actions": {"LOCAL_DOMAIN_SPOOFED": "deliver"}}, ["Authenticate senders"],
                                       "forging a local domain"),
    "unverified local domain delivered": ({"actions": {"LOCAL_DOMAIN_UNVERIFIED": "deliver"}},
                                          ["Authenticate senders"], "could not be read"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_setting_turned_off_is_not_met_and_its_change_meets_it_again(case, good):
    override, words, why = BROKEN[case]
    document = merge(good, override)
    flagged = not_met(parse(dump(document)))
    assert [f.recommendation for f in flagged] == [
        f.recommendation for f in audit(parse(dump(good))) if any(w in f.recommendation for w in words)
    ]
    assert why in flagged[0].why, flagged[0].why
    fixed = document
    for f in flagged:
        assert f.fix, f.recommendation
        fixed = merge(fixed, f.fix)
    assert not_met(parse(dump(fixed))) == []


def test_the_macro_rule_reads_the_macros_check_not_the_antivirus_one(good):
    # Macro detection is its own check: virus scanning off leaves it on.
    policy = parse(dump(merge(good, {"checks": {"antivirus": {"enabled": False}}})))
    assert [f.recommendation for f in not_met(policy)] == [
        "Protect your email infrastructure from malware (scan; refuse or quarantine; quarantine unscannable)"]


def test_a_local_address_on_the_allow_list_is_not_met_and_removing_it_validates(good):
    document = merge(good, {"allow_list": {"senders": ["boss@example.com", "partner@other.org"],
                                           "domains": ["example.com", "other.org"]}})
    with pytest.raises(PolicyError):
        parse(dump(document))  # validation refuses it; only a policy built without it gets this far
    flagged = not_met(Policy.model_validate(document))
    assert len(flagged) == 1 and ALLOW_LOCAL_REASON in flagged[0].why
    fixed = parse(dump(merge(document, flagged[0].fix)))
    assert fixed.allow_list.senders == ["partner@other.org"] and fixed.allow_list.domains == ["other.org"]
    assert not_met(fixed) == []


def test_placeholders_say_the_administrator_must_put_in_their_own():
    f = {x.recommendation: x for x in not_met(parse(dump(MINIMAL)))}
    changes = " ".join(x.change for x in f.values())
    assert "put in your own (LDAP" in changes
    assert "put in your own mail server" in changes
    assert "XX is a placeholder" in changes and "put in yours, it must exist" in changes


def test_requiring_auth_on_a_listener_also_offers_it(good):
    document = merge(good, BROKEN["submissions without auth"][0])
    (flagged,) = not_met(parse(dump(document)))
    fixed = parse(dump(merge(document, flagged.fix)))
    assert fixed.listeners.submissions.auth and fixed.listeners.submissions.require_auth

"""SPF (RFC 7208) for MAIL FROM and HELO, against records NSD serves: every result, none a crash."""

from __future__ import annotations

import asyncio

import pytest

from streams.checks import spf
from tests.sender_auth_world import SENDER_IP, STRANGER_IP, email, judge, message, policy, world_fixture

dns_world = world_fixture()


def results(mail_from: str, client_ip: str = SENDER_IP, helo: str | None = "mail.auth.test", **settings):
    msg = message(email(), mail_from=mail_from, client_ip=client_ip, helo=helo)
    return {r.name: r for r in asyncio.run(spf.check(msg, spf.Settings(**settings)))}, msg


def test_an_authorised_client_passes_for_mail_from_and_helo():
    found, msg = results("alice@auth.test")
    assert set(found) == {"SPF_PASS", "SPF_HELO_PASS"}
    assert found["SPF_PASS"].outcome == "pass" and found["SPF_PASS"].evidence == ["auth.test"]
    assert msg.authentication_results["spf"] == ["spf=pass smtp.mailfrom=alice@auth.test",
                                                 "spf=pass smtp.helo=mail.auth.test"]


@pytest.mark.parametrize("mail_from, client_ip, expected, outcome", [
    ("alice@auth.test", STRANGER_IP, "SPF_FAIL", "hit"),
    ("alice@soft.auth.test", SENDER_IP, "SPF_SOFTFAIL", "hit"),
    ("alice@neutral.auth.test", SENDER_IP, "SPF_NEUTRAL", "pass"),
    ("alice@nospf.auth.test", SENDER_IP, "SPF_NONE", "pass"),
    ("alice@forwarder.test", SENDER_IP, "SPF_FAIL", "hit"),
])
def test_each_spf_result_is_named(mail_from, client_ip, expected, outcome):
    found, _ = results(mail_from, client_ip)
    assert found[expected].outcome == outcome, found
    assert client_ip in found[expected].detail


@pytest.mark.parametrize("domain, why", [
    ("syntax.auth.test", "999.1.2.3"),
    ("twice.auth.test", "Two or more type TXT spf records"),
    ("loop.auth.test", "recursion"),
    ("dangling.auth.test", "No valid SPF record for included domain"),
])
def test_malformed_records_are_a_permerror_not_a_crash(domain, why):
    found, msg = results(f"alice@{domain}")
    assert found["SPF_PERMERROR"].outcome == "hit", found
    assert why in found["SPF_PERMERROR"].detail
    assert msg.authentication_results["spf"][0].startswith("spf=permerror reason=")


def test_a_dns_failure_is_a_temperror_not_a_crash():
    for sender in ("alice@unreachable.auth.test", "alice@nowhere.test"):
        found, _ = results(sender)
        assert found["SPF_TEMPERROR"].outcome == "fail", found
        assert "DNS" in found["SPF_TEMPERROR"].detail


def test_the_null_sender_is_checked_as_postmaster_at_helo():
    found, msg = results("")
    assert found["SPF_PASS"].detail.startswith("mailfrom postmaster@mail.auth.test")
    assert msg.authentication_results["spf"][0] == "spf=pass smtp.mailfrom=postmaster@mail.auth.test"
    found, _ = results("", client_ip=STRANGER_IP)
    assert {"SPF_FAIL", "SPF_HELO_FAIL"} <= set(found)


def test_a_helo_that_is_no_domain_name_is_not_checked():
    for helo in ("[192.0.2.10]", "192.0.2.10", "localhost"):
        found, _ = results("alice@auth.test", helo=helo)
        assert found["SPF_HELO_NONE"].outcome == "pass" and "not a domain name" in found["SPF_HELO_NONE"].detail
    found, _ = results("alice@auth.test", helo=None)
    assert set(found) == {"SPF_PASS"}
    found, _ = results("alice@auth.test", check_helo=False)
    assert set(found) == {"SPF_PASS"}


def test_a_fail_is_tagged_by_default_and_the_policy_may_hold_it():
    msg = message(email("alice@nodmarc.test"), mail_from="alice@nodmarc.test", client_ip=STRANGER_IP, helo=None)
    verdict, _ = judge(msg)
    assert (verdict.action, verdict.tags) == ("deliver", ["SPF_FAIL"])
    msg = message(email("alice@nodmarc.test"), mail_from="alice@nodmarc.test", client_ip=STRANGER_IP, helo=None,
                  pol=policy("  spf: {when_fail: quarantine}\n"))
    verdict, _ = judge(msg)
    assert (verdict.action, verdict.reasons) == ("quarantine", ["SPF_FAIL"])


def test_only_mail_from_the_internet_is_checked():
    for direction in ("outbound", "internal"):
        msg = message(email(), client_ip=STRANGER_IP, direction=direction)
        assert asyncio.run(spf.check(msg, spf.Settings())) == []
        assert msg.authentication_results == {}


def test_a_client_address_that_is_no_ip_is_none():
    found, _ = results("alice@auth.test", client_ip="unknown")
    assert found["SPF_NONE"].outcome == "pass" and "not an IP" in found["SPF_NONE"].detail

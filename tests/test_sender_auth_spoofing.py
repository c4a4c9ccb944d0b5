"""Spoofing of local domains and display-name impersonation, on mail from the Internet."""

from __future__ import annotations

import asyncio
from email.header import Header

import pytest

from streams.checks import impersonation, local_spoofing
from tests.sender_auth_keys import ARC_TRUSTED, RSA
from tests.sender_auth_world import (FORWARDER_IP, LOCAL_SERVER_IP, STRANGER_IP, email, forwarded, judge, message,
                                     policy, signed, world_fixture)

dns_world = world_fixture()


def judged(raw: bytes, mail_from: str = "mallory@nodmarc.test", client_ip: str = STRANGER_IP, pol=None):
    verdict, _ = judge(message(raw, mail_from=mail_from, client_ip=client_ip, helo=None, pol=pol))
    return verdict, {r.check: r for r in verdict.results}


# -- local domains -----------------------------------------------------------------------


def test_a_local_from_that_dmarc_does_not_authenticate_is_refused_even_under_p_none():
    verdict, found = judged(email("The CEO <ceo@example.test>"))
    assert found["dmarc"].name == "DMARC_FAIL_NONE"  # the local domain only monitors...
    spoofed = found["local_spoofing"]
    assert (spoofed.name, spoofed.outcome) == ("LOCAL_DOMAIN_SPOOFED", "hit")  # ...the gateway protects it anyway
    assert spoofed.evidence == ["example.test"] and f"from {STRANGER_IP}: DMARC fail" in spoofed.detail
    assert (verdict.action, verdict.reasons) == ("reject", ["LOCAL_DOMAIN_SPOOFED"])


def test_subdomains_of_local_domains_are_protected_too():
    _, found = judged(email("ceo@hr.example.test"))
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_SPOOFED"


def test_a_local_from_with_an_aligned_signature_or_spf_pass_is_authenticated():
    verdict, found = judged(signed(email("ceo@example.test"), RSA, "rsa", domain="example.test"))
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_AUTHENTICATED" and verdict.action == "deliver"
    verdict, found = judged(email("ceo@example.test"), mail_from="ceo@example.test", client_ip=LOCAL_SERVER_IP)
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_AUTHENTICATED" and verdict.action == "deliver"


def test_a_trusted_forwarder_may_vouch_for_a_local_sender():
    saw = "dkim=pass header.d=example.test header.s=rsa; dmarc=pass header.from=example.test"
    raw = forwarded(signed(email("ceo@example.test"), RSA, "rsa", domain="example.test"), "forwarder.test",
                    ARC_TRUSTED, saw)
    verdict, found = judged(raw, mail_from="list-bounces@forwarder.test", client_ip=FORWARDER_IP)
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_AUTHENTICATED"
    assert "trusted forwarder forwarder.test" in found["local_spoofing"].detail and verdict.action == "deliver"


def test_a_local_domain_without_a_record_or_whose_record_cannot_be_read():
    pol = policy().model_copy(update={"local_domains": ["example.test", "nodmarc.test", "nowhere.test"]})
    verdict, found = judged(email("ceo@nodmarc.test"), pol=pol)
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_SPOOFED"
    assert "publishes no DMARC record" in found["local_spoofing"].detail and verdict.action == "reject"
    verdict, found = judged(email("ceo@nowhere.test"), pol=pol)
    assert (found["local_spoofing"].name, found["local_spoofing"].outcome) == ("LOCAL_DOMAIN_UNVERIFIED", "fail")
    assert verdict.action == "quarantine"


def test_two_from_fields_with_a_local_one_are_spoofing():
    raw = b"From: ceo@example.test\r\nFrom: mallory@nodmarc.test\r\nSubject: x\r\n\r\nHi.\r\n"
    _, found = judged(raw)
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_SPOOFED" and "2 From: fields" in found["local_spoofing"].detail


def test_quarantine_instead_and_exempt_networks_are_settings():
    pol = policy("  local_spoofing: {when_spoofed: quarantine, exempt_networks: [203.0.113.0/24]}\n")
    verdict, _ = judged(email("ceo@example.test"), pol=pol)
    assert (verdict.action, verdict.reasons) == ("quarantine", ["LOCAL_DOMAIN_SPOOFED"])
    verdict, found = judged(email("ceo@example.test"), client_ip="203.0.113.9", pol=pol)
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_EXEMPT" and verdict.action == "deliver"
    with pytest.raises(Exception, match="not an IP address"):
        local_spoofing.Settings(exempt_networks=["newsletters"])


def test_mail_not_claiming_a_local_domain_gets_no_spoofing_result():
    _, found = judged(email("someone@nodmarc.test"))
    assert "local_spoofing" not in found
    outbound = message(email("ceo@example.test"), direction="outbound", client_ip=STRANGER_IP)
    assert asyncio.run(local_spoofing.check(outbound, local_spoofing.Settings())) == []


# -- display names -------------------------------------------------------------------


@pytest.mark.parametrize("sender", [
    "Cora Chief <cora.chief@freemail.test>",
    '"Chief, Cora" <ceo.office@freemail.test>',
    "CÓRA CHIEF (CEO) <c@freemail.test>",
    "Сora Chіef <c@freemail.test>",  # a Cyrillic С and і
    "Cora\u200b Chief <c@freemail.test>",  # an invisible space
    f"{Header('Cora Chief', 'utf-8').encode()} <c@freemail.test>",  # RFC 2047
    '"ceo@example.test" <c@freemail.test>',  # shows a local address
])
def test_a_listed_person_s_name_on_an_outside_address_is_held(sender):
    verdict, found = judged(email(sender))
    assert (found["impersonation"].name, found["impersonation"].outcome) == ("DISPLAY_NAME_IMPERSONATION", "hit")
    assert verdict.action == "quarantine" and "DISPLAY_NAME_IMPERSONATION" in verdict.reasons


@pytest.mark.parametrize("sender", [
    "Bob Payne <bob.payne@home.test>",  # his own outside address, listed
    "Cora Chiefson <cora@freemail.test>",  # another name
    "Cora <cora@freemail.test>",  # half a name
    "newsletter@freemail.test",
])
def test_other_names_and_a_person_s_own_addresses_pass(sender):
    _, found = judged(email(sender))
    assert found["impersonation"].name == "DISPLAY_NAME_CLEAN"


def test_a_local_from_is_left_to_the_spoofing_check_and_nothing_is_listed_by_default():
    _, found = judged(email("Cora Chief <cora.chief@example.test>"))
    assert found["impersonation"].name == "DISPLAY_NAME_CLEAN"
    assert found["local_spoofing"].name == "LOCAL_DOMAIN_SPOOFED"
    msg = message(email("Cora Chief <c@freemail.test>"), client_ip=STRANGER_IP)
    assert asyncio.run(impersonation.check(msg, impersonation.Settings())) == []


def test_the_policy_may_refuse_impersonation_and_lists_people_by_name_or_with_addresses():
    pol = policy("  impersonation: {when_found: refuse, people: [{name: Dana Ledger, addresses: [d@home.test]}]}\n")
    verdict, _ = judged(email("Dana LEDGER <dl@freemail.test>"), pol=pol)
    assert (verdict.action, verdict.reasons) == ("reject", ["DISPLAY_NAME_IMPERSONATION"])
    with pytest.raises(Exception, match="no letters or digits"):
        impersonation.Settings(people=["--"])

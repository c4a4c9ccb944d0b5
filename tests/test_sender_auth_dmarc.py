"""DMARC (RFC 7489): alignment, policy discovery, p/sp/pct, and what the verdict does with each result."""

from __future__ import annotations

import asyncio

import pytest

from streams.checks import dmarc
from tests.sender_auth_keys import ED25519, RSA
from tests.sender_auth_world import (SENDER_IP, STRANGER_IP, email, judge, message, policy, signed,
                                     world_fixture)

dns_world = world_fixture()


def evaluate(raw: bytes, mail_from: str, client_ip: str = SENDER_IP, helo: str | None = "mail.auth.test",
             pol=None, message_id: str = "m1"):
    msg = message(raw, mail_from=mail_from, client_ip=client_ip, helo=helo, pol=pol, message_id=message_id)
    verdict, _ = judge(msg)
    [found] = [r for r in verdict.results if r.check == "dmarc"]
    return found, verdict


def test_an_aligned_dkim_signature_passes_even_when_spf_fails():
    found, verdict = evaluate(signed(email(), RSA, "rsa"), "alice@auth.test", STRANGER_IP)
    assert (found.name, found.outcome) == ("DMARC_PASS", "pass") and "aligned DKIM" in found.detail
    assert verdict.action == "deliver"
    assert "dmarc=pass (p=reject sp=quarantine dis=none) header.from=auth.test" in verdict.authentication_results


def test_an_aligned_spf_pass_passes_unsigned_mail_relaxed_alignment_by_organisation():
    # MAIL FROM in a subdomain, From: the parent: aligned under relaxed alignment (RFC 7489 3.1.2).
    found, _ = evaluate(email("alice@auth.test"), "bounces@monitor.auth.test")
    assert found.name == "DMARC_PASS" and "aligned SPF" in found.detail


def test_the_null_sender_is_judged_by_its_helo_identity():
    found, _ = evaluate(email(), "", helo="mail.auth.test")
    assert found.name == "DMARC_PASS"


def test_a_forgery_under_p_reject_is_refused():
    found, verdict = evaluate(email(), "alice@auth.test", STRANGER_IP)
    assert (found.name, found.outcome) == ("DMARC_FAIL_REJECT", "hit")
    assert "SPF fail for auth.test" in found.detail and "no DKIM signature" in found.detail
    assert (verdict.action, verdict.reasons) == ("reject", ["DMARC_FAIL_REJECT"])
    assert "dmarc=fail (p=reject sp=quarantine dis=reject) header.from=auth.test policy.dmarc=reject" in \
        verdict.authentication_results


def test_a_signature_of_another_domain_does_not_align():
    raw = signed(email(), RSA, "rsa", domain="example.test")  # a valid signature, but not the author's domain
    found, _ = evaluate(raw, "alice@auth.test", STRANGER_IP)
    assert found.name == "DMARC_FAIL_REJECT" and "DKIM pass d=example.test (not aligned)" in found.detail


def test_p_quarantine_quarantines_and_p_none_delivers():
    found, verdict = evaluate(email("x@q.auth.test"), "x@q.auth.test", STRANGER_IP)
    assert found.name == "DMARC_FAIL_QUARANTINE" and verdict.action == "quarantine"
    found, verdict = evaluate(email("x@monitor.auth.test"), "x@monitor.auth.test", STRANGER_IP)
    assert found.name == "DMARC_FAIL_NONE" and (verdict.action, verdict.reasons) == ("deliver", [])


def test_each_policy_s_action_is_a_setting():
    pol = policy("  dmarc: {when_reject: quarantine, when_none: tag}\n")
    _, verdict = evaluate(email(), "alice@auth.test", STRANGER_IP, pol=pol)
    assert (verdict.action, verdict.reasons) == ("quarantine", ["DMARC_FAIL_REJECT"])
    _, verdict = evaluate(email("x@monitor.auth.test"), "x@monitor.auth.test", STRANGER_IP, pol=pol)
    assert verdict.action == "deliver" and verdict.tags == ["DMARC_FAIL_NONE", "SPF_FAIL", "SPF_HELO_FAIL"]
    pol = policy("actions: {DMARC_FAIL_QUARANTINE: reject}\n")
    _, verdict = evaluate(email("x@q.auth.test"), "x@q.auth.test", STRANGER_IP, pol=pol)
    assert verdict.action == "reject"


def test_a_subdomain_without_a_record_gets_the_organisation_s_sp():
    found, _ = evaluate(email("x@deep.auth.test"), "x@deep.auth.test", STRANGER_IP)
    assert found.name == "DMARC_FAIL_QUARANTINE" and "under p=quarantine (record at _dmarc.auth.test)" in found.detail


def test_pct_leaves_a_message_the_next_less_strict_policy_and_decides_the_same_every_time():
    for message_id in ("m1", "m2", "m1"):
        found, verdict = evaluate(email("x@sampled.auth.test"), "x@sampled.auth.test", STRANGER_IP,
                                  message_id=message_id)
        assert found.name == "DMARC_FAIL_QUARANTINE" and "sampled out by pct=0" in found.detail
        assert "pct=0 dis=quarantine" in verdict.authentication_results


def test_strict_alignment_wants_the_very_domain():
    raw = signed(email("x@strict.auth.test"), ED25519, "ed")  # d=auth.test: aligned only under relaxed
    found, _ = evaluate(raw, "x@strict.auth.test", STRANGER_IP)
    assert found.name == "DMARC_FAIL_REJECT" and "(not aligned)" in found.detail


def test_a_domain_without_a_record_takes_no_part():
    found, verdict = evaluate(email("x@nodmarc.test"), "x@nodmarc.test", STRANGER_IP)
    assert (found.name, found.outcome) == ("DMARC_NONE", "pass") and "publishes no DMARC record" in found.detail
    assert "dmarc=none header.from=nodmarc.test" in verdict.authentication_results


def test_a_dns_failure_is_a_temperror_and_delivered():
    found, verdict = evaluate(email("x@nowhere.test"), "x@nowhere.test", STRANGER_IP)
    assert (found.name, found.outcome) == ("DMARC_TEMPERROR", "fail") and "DNS" in found.detail
    assert verdict.action == "deliver"


@pytest.mark.parametrize("domain, expected, why", [
    ("badpolicy.auth.test", "DMARC_PERMERROR", "no valid p="),
    ("tworecords.auth.test", "DMARC_PERMERROR", "has 2 DMARC records"),
    ("badrua.auth.test", "DMARC_FAIL_NONE", "p=none"),  # RFC 7489 6.6.3: a rua makes it p=none
    ("notfirst.auth.test", "DMARC_FAIL_QUARANTINE", "record at _dmarc.auth.test"),  # not a DMARC record
])
def test_malformed_records_are_results_never_a_crash(domain, expected, why):
    found, _ = evaluate(email(f"x@{domain}"), f"x@{domain}", STRANGER_IP)
    assert found.name == expected and why in found.detail, found


@pytest.mark.parametrize("headers, why", [
    (b"From: a@auth.test\r\nFrom: a@nodmarc.test\r\n", "2 From: fields"),
    (b"", "no From: field"),
    (b"From: a@auth.test, b@nodmarc.test\r\n", "several domains"),
    (b"From: undisclosed\r\n", "no address with a domain"),
])
def test_no_single_from_domain_is_held(headers, why):
    raw = headers + b"To: bob@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
    found, verdict = evaluate(raw, "alice@auth.test", STRANGER_IP)
    assert (found.name, found.outcome) == ("DMARC_BAD_FROM", "hit") and why in found.detail
    assert verdict.action == "quarantine"


def test_record_parsing_follows_the_rfc():
    from streams.sender_auth import RecordError, parse_record

    record = parse_record("v=DMARC1;p=Reject; SP=none;adkim=s; pct=150; unknown=tag", "x.test")
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == ("reject", "none", "s", "r", 100)
    for bad in ("v=DMARC2; p=reject", "v=DMARC1", "v=DMARC1; p", "v=DMARC1; sp=reject"):
        with pytest.raises(RecordError):
            parse_record(bad, "x.test")


def test_outbound_mail_is_not_judged():
    msg = message(email(), client_ip=STRANGER_IP, direction="outbound")
    assert asyncio.run(dmarc.check(msg, dmarc.Settings())) == []


def test_the_verdict_s_header_names_the_gateway_and_lists_every_method_in_order():
    _, verdict = evaluate(signed(email(), RSA, "rsa"), "alice@auth.test")
    lines = verdict.authentication_results.split("\r\n\t")
    assert lines[0] == "gw.example.test;"
    assert [line.split("=", 1)[0] for line in lines[1:]] == ["spf", "spf", "dkim", "dmarc", "arc"]
    assert all(line.endswith(";") for line in lines[1:-1]) and not lines[-1].endswith(";")

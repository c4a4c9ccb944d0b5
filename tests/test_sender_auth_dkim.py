"""DKIM (RFC 6376): every signature verified, RSA and Ed25519 (RFC 8463), keys from NSD; broken ones are results."""

from __future__ import annotations

import asyncio

import dkim
import pytest

from streams.checks import dkim as check
from tests.sender_auth_keys import ED25519, RSA, RSA_1024
from tests.sender_auth_world import email, judge, message, signed, world_fixture

dns_world = world_fixture()


def verify(raw: bytes, **settings):
    msg = message(raw)
    return asyncio.run(check.check(msg, check.Settings(**settings))), msg


def test_rsa_and_ed25519_signatures_each_verify():
    raw = signed(signed(email(), RSA, "rsa"), ED25519, "ed")
    found, msg = verify(raw)
    assert [(r.name, r.outcome) for r in found] == [("DKIM_PASS", "pass"), ("DKIM_PASS", "pass")]
    assert "s=ed a=ed25519-sha256" in found[0].detail and "s=rsa a=rsa-sha256" in found[1].detail
    clauses = msg.authentication_results["dkim"]
    assert clauses[0].startswith("dkim=pass header.d=auth.test header.s=ed header.a=ed25519-sha256 header.b=")
    assert clauses[1].startswith("dkim=pass header.d=auth.test header.s=rsa header.a=rsa-sha256 header.b=")


def test_an_unsigned_message_is_none():
    found, msg = verify(email())
    assert [(r.name, r.outcome) for r in found] == [("DKIM_NONE", "pass")]
    assert msg.authentication_results["dkim"] == ["dkim=none"]


def test_a_signature_quoted_in_the_body_is_not_a_signature():
    # Unsigned mail is answered without dkimpy (streams/sender_auth.py); a
    # forwarded-as-text message carries its signature in the body only.
    quoted = signed(email(), RSA, "rsa").replace(b"\r\n\r\n", b"\r\n", 1)
    raw = email(body="Forwarded:\n\n" + quoted.decode())
    assert [r.name for r in verify(raw)[0]] == ["DKIM_NONE"]


def test_a_signature_field_named_in_any_case_is_verified():
    raw = signed(email(), RSA, "rsa")
    assert raw.startswith(b"DKIM-Signature:")
    lowered = b"dkim-signature :" + raw[len(b"DKIM-Signature:"):]
    [found], _ = verify(lowered)
    assert found.name != "DKIM_NONE"  # dkimpy's verdict on it, whatever it is, not "unsigned"
    assert found.name == check_full(lowered)


def check_full(raw: bytes) -> str:
    """What dkimpy alone says about the first signature (no shortcut)."""
    from streams import sender_auth

    results = sender_auth._evaluate_dkim(raw, sender_auth.resolvers()[1])
    return {"pass": "DKIM_PASS"}.get(results[0].result, "DKIM_" + results[0].result.upper())


def test_a_changed_body_or_header_fails_and_the_good_signature_still_passes():
    raw = signed(email(body="Pay invoice 1.\n"), RSA, "rsa")
    tampered = raw.replace(b"Pay invoice 1.", b"Pay invoice 9.")
    [found], _ = verify(tampered)
    assert (found.name, found.outcome) == ("DKIM_FAIL", "hit") and "body hash mismatch" in found.detail
    resigned = signed(tampered.replace(b"Subject: Quarterly", b"Subject: Urgent"), ED25519, "ed")
    found, _ = verify(resigned)
    assert [r.name for r in found] == ["DKIM_PASS", "DKIM_FAIL"]


@pytest.mark.parametrize("selector, key, why", [
    ("missing", RSA, "no key at missing._domainkey.auth.test"),
    ("revoked", RSA, "revoked"),
    ("garbled", RSA, "unusable key"),
    ("ed", RSA, "the key is k=ed25519, the signature a=rsa-sha256"),
])
def test_a_missing_revoked_or_wrong_key_is_a_recorded_result(selector, key, why):
    [found], msg = verify(signed(email(), key, selector))
    assert found.name in ("DKIM_PERMERROR", "DKIM_FAIL") and why in found.detail, found
    assert msg.authentication_results["dkim"][0].startswith(f"dkim={found.name.split('_')[1].lower()} reason=")


def test_a_key_nobody_can_fetch_is_a_temperror():
    [found], _ = verify(signed(email("a@nowhere.test"), RSA, "rsa", domain="nowhere.test"))
    assert (found.name, found.outcome) == ("DKIM_TEMPERROR", "fail") and "DNS" in found.detail


@pytest.mark.parametrize("mangle, why", [
    (lambda h: h.replace(b"bh=", b"bx="), "malformed signature"),  # a required tag missing
    (lambda h: h.replace(b"; d=auth.test", b"; d="), "malformed signature"),
    (lambda h: h.replace(b"a=rsa-sha256", b"a=rsa-md5"), "malformed signature"),
    (lambda h: h.replace(b"a=rsa-sha256", b"a=rsa-sha1"), "RFC 8301"),
    (lambda h: b"DKIM-Signature: v=1; this is not a tag list\r\n", "not a tag list"),
    (lambda h: h.replace(b"v=1", b"v=9"), "malformed signature"),
])
def test_malformed_signatures_are_a_permerror_not_a_crash(mangle, why):
    raw = email()
    header = dkim.sign(raw, b"rsa", b"auth.test", RSA.private)
    [found], _ = verify(mangle(header) + raw)
    assert (found.name, found.outcome) == ("DKIM_PERMERROR", "hit") and why in found.detail, found


def test_keys_shorter_than_the_policy_asks_are_refused():
    [found], _ = verify(signed(email(), RSA_1024, "small"))
    assert found.name == "DKIM_PASS"  # 1024 bits: RFC 8301's floor
    [found], _ = verify(signed(email(), RSA_1024, "small"), min_rsa_bits=2048)
    assert found.name == "DKIM_PERMERROR" and "1024 bits" in found.detail


def test_a_message_too_broken_to_parse_is_still_a_result():
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=auth.test; s=rsa\r\nthis line has no colon\r\n\r\nbody\r\n"
    found, _ = verify(raw)
    assert [r.name for r in found] == ["DKIM_PERMERROR"]


def test_no_dkim_result_changes_the_action_by_itself():
    raw = signed(email("alice@nodmarc.test"), RSA, "missing", domain="nodmarc.test")
    verdict, _ = judge(message(raw, mail_from="alice@nodmarc.test"))
    assert verdict.action == "deliver" and "DKIM_PERMERROR" in [r.name for r in verdict.results]

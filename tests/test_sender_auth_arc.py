"""ARC (RFC 8617): chains sealed by dkimpy in the test; only a trusted forwarder's intact chain overrides DMARC."""

from __future__ import annotations

import asyncio

from streams.checks import arc
from tests.sender_auth_keys import ARC_OTHER, ARC_TRUSTED, RSA
from tests.sender_auth_world import (FORWARDER_IP, email, forwarded, judge, message, policy, signed,
                                     world_fixture)

dns_world = world_fixture()

SAW_PASS = "spf=pass smtp.mailfrom=alice@auth.test; dkim=pass header.d=auth.test header.s=rsa; " \
           "dmarc=pass header.from=auth.test"


def original() -> bytes:
    """alice@auth.test's message as she sent it: signed, and its domain's DMARC is p=reject."""
    return signed(email(), RSA, "rsa")


def relayed(raw: bytes, sealer: str = "forwarder.test", pol=None):
    """The list's copy arriving from the list's server, MAIL FROM the list's bounce address."""
    msg = message(raw, mail_from=f"list-bounces@{sealer}", client_ip=FORWARDER_IP, helo=sealer, pol=pol)
    verdict, _ = judge(msg)
    return verdict, {r.check: r for r in verdict.results}


def test_a_trusted_forwarder_s_intact_chain_overrides_the_dmarc_failure():
    verdict, found = relayed(forwarded(original(), "forwarder.test", ARC_TRUSTED, SAW_PASS))
    assert [r.name for r in verdict.results if r.check == "dkim"] == ["DKIM_FAIL"]  # the list changed the subject
    assert (found["arc"].name, found["arc"].outcome) == ("ARC_PASS", "pass")
    assert "sealed by forwarder.test (trusted)" in found["arc"].detail
    assert (found["dmarc"].name, found["dmarc"].outcome) == ("DMARC_TRUSTED_FORWARDER", "pass")
    assert "trusted forwarder forwarder.test (ARC i=1) saw spf=pass" in found["dmarc"].detail
    assert verdict.action == "deliver"
    header = verdict.authentication_results
    assert "arc=pass (i=1 forwarder.test) smtp.remote-ip=192.0.2.30" in header
    assert 'dmarc=fail (p=reject sp=quarantine dis=reject) reason="trusted forwarder forwarder.test' in header
    assert "policy.dmarc=none" in header


def test_an_untrusted_forwarder_s_chain_is_recorded_but_overrides_nothing():
    verdict, found = relayed(forwarded(original(), "untrusted.test", ARC_OTHER, SAW_PASS), "untrusted.test")
    assert found["arc"].name == "ARC_PASS" and "(trusted)" not in found["arc"].detail
    assert (found["dmarc"].name, verdict.action) == ("DMARC_FAIL_REJECT", "reject")


def test_a_trusted_forwarder_that_saw_a_failure_vouches_for_nothing():
    saw = "spf=fail smtp.mailfrom=alice@auth.test; dkim=none; dmarc=fail header.from=auth.test"
    verdict, found = relayed(forwarded(original(), "forwarder.test", ARC_TRUSTED, saw))
    assert found["arc"].name == "ARC_PASS" and found["dmarc"].name == "DMARC_FAIL_REJECT"


def test_a_message_changed_after_sealing_breaks_the_chain():
    sealed = forwarded(original(), "forwarder.test", ARC_TRUSTED, SAW_PASS)
    verdict, found = relayed(sealed.replace(b"Hello.", b"Pay now."))
    assert (found["arc"].name, found["arc"].outcome) == ("ARC_FAIL", "hit")
    assert "did not validate" in found["arc"].detail
    assert found["dmarc"].name == "DMARC_FAIL_REJECT" and verdict.action == "reject"


def test_only_the_newest_sealer_s_word_counts():
    first = forwarded(original(), "forwarder.test", ARC_TRUSTED, SAW_PASS)
    second = forwarded(first, "untrusted.test", ARC_OTHER, "arc=pass; dkim=fail header.d=auth.test")
    verdict, found = relayed(second, "untrusted.test")
    assert found["arc"].name == "ARC_PASS" and found["arc"].evidence == ["untrusted.test", "forwarder.test"]
    assert found["dmarc"].name == "DMARC_FAIL_REJECT"


def test_with_the_arc_check_off_no_chain_is_trusted():
    pol = policy("  arc: {enabled: false, trusted_forwarders: [forwarder.test]}\n")
    verdict, found = relayed(forwarded(original(), "forwarder.test", ARC_TRUSTED, SAW_PASS), pol=pol)
    assert "arc" not in found and found["dmarc"].name == "DMARC_FAIL_REJECT"
    assert "\tarc=" not in verdict.authentication_results


def test_malformed_arc_sets_are_a_failure_not_a_crash():
    raw = email()  # unsigned: only the ARC set could vouch for it
    broken = [
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=forwarder.test; s=arc; b=AAAA\r\n" + raw,  # no AMS, no AAR
        b"ARC-Seal: garbage\r\nARC-Message-Signature: i=1; junk\r\nARC-Authentication-Results: i=1; x\r\n" + raw,
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=forwarder.test; s=arc; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; d=forwarder.test; s=arc; h=from; bh=AAAA; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=1; forwarder.test; dmarc=pass header.from=auth.test\r\n" + raw,
    ]
    for raw in broken:
        msg = message(raw, mail_from="list-bounces@forwarder.test", client_ip=FORWARDER_IP)
        [found] = asyncio.run(arc.check(msg, arc.Settings(trusted_forwarders=["forwarder.test"])))
        assert (found.name, found.outcome) == ("ARC_FAIL", "hit"), found
        verdict, _ = judge(message(raw, mail_from="list-bounces@forwarder.test", client_ip=FORWARDER_IP))
        assert "DMARC_FAIL_REJECT" in verdict.reasons


def test_a_sealer_key_nobody_can_fetch_is_a_temperror():
    raw = forwarded(original(), "nowhere.test", ARC_OTHER, SAW_PASS)
    msg = message(raw, mail_from="list-bounces@nowhere.test", client_ip=FORWARDER_IP)
    [found] = asyncio.run(arc.check(msg, arc.Settings()))
    assert (found.name, found.outcome) == ("ARC_TEMPERROR", "fail") and "DNS" in found.detail


def test_unsealed_mail_is_none():
    msg = message(original())
    [found] = asyncio.run(arc.check(msg, arc.Settings()))
    assert (found.name, found.outcome) == ("ARC_NONE", "pass")
    assert msg.authentication_results["arc"] == ["arc=none smtp.remote-ip=192.0.2.10"]


def test_unsealed_mail_gets_dkimpy_s_own_answer():
    # Answered without dkimpy when no ARC field is there (streams/sender_auth.py): the same words.
    from streams import sender_auth

    raw = original()
    assert asyncio.run(sender_auth.arc_result(message(raw))) == sender_auth._evaluate_arc(
        raw, sender_auth.resolvers()[1])


def test_a_set_quoted_in_the_body_is_not_a_set_and_a_real_one_in_any_case_is_verified():
    sealed = forwarded(original(), "forwarder.test", ARC_TRUSTED, SAW_PASS)
    quoted = email(body="Forwarded:\n\n" + sealed.replace(b"\r\n\r\n", b"\r\n", 1).decode())
    [found] = asyncio.run(arc.check(message(quoted), arc.Settings()))
    assert found.name == "ARC_NONE"
    lowered = sealed.replace(b"ARC-Seal:", b"arc-seal:", 1)
    assert lowered != sealed
    verdict, found = relayed(lowered)
    assert found["arc"].name != "ARC_NONE"


def test_trusted_forwarders_must_be_domains():
    import pytest
    from pydantic import ValidationError

    assert arc.Settings(trusted_forwarders=["Lists.Example.ORG."]).trusted_forwarders == ["lists.example.org"]
    with pytest.raises(ValidationError):
        arc.Settings(trusted_forwarders=["lists@example.org"])

"""Sender authentication through the real stack: SPF, DKIM, DMARC and ARC against NSD, the header at the downstream.

The gateway's resolver is the session's NSD, which serves auth-test.test
(SPF, DKIM RSA and Ed25519, DMARC p=reject, a p=quarantine subdomain), the
trusted mailing list fwd-test.test and the local domain's DMARC record
(conftest.sender_auth_zones). Messages are signed and sealed here with
dkimpy, with the keys NSD publishes, and sent from 127.0.2.2xx.
"""

from __future__ import annotations

import email
import email.policy
import uuid

import dkim
import pytest

from bulwark.dns import blocking_resolver_for
from schemas import events as ev
from schemas.topics import QUARANTINE, VERDICTS
from streams.sender_auth import KeyLookup
from tests.sender_auth_keys import ARC_TRUSTED, ED25519, RSA
from tests.sender_auth_world import email as make_email
from tests.sender_auth_world import forwarded, signed

from .conftest import AUTH_DOMAIN, AUTH_SENDER_IP, FORWARDER_DOMAIN, FORWARDER_IP, LOCAL_DOMAIN

pytestmark = pytest.mark.integration

GATEWAY = "gateway.example.test"  # the test policy's hostname: the authserv-id
RCPT = f"pam@{LOCAL_DOMAIN}"


def _subject(what: str) -> str:
    return f"{what} {uuid.uuid4().hex[:10]}"


def _send(gateway, raw: bytes, mail_from: str, source_ip: str, helo: str) -> tuple[int, bytes]:
    with gateway.smtp(source_ip) as client:
        client.ehlo(helo)
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        return client.data(raw)


def _verdict(gateway, queue_id: str) -> ev.Verdict:
    [record] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={queue_id},
                                    timeout=60, what=f"verdict for {queue_id}")
    return record.event


def _results(verdict: ev.Verdict, check: str) -> list[str]:
    return [r.name for r in verdict.results if r.check == check]


def _auth_results(content: bytes) -> list[str]:
    """The Authentication-Results fields of a delivered message, unfolded, in order."""
    parsed = email.message_from_bytes(content, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for v in parsed.get_all("Authentication-Results") or []]


def test_signed_mail_is_delivered_with_the_gateway_s_results_and_forged_ones_removed(gateway):
    subject = _subject("signed")
    raw = make_email(f"Alice <alice@{AUTH_DOMAIN}>", subject, to=RCPT)
    # A sender's claims in the gateway's name go; another server's stay.
    raw = (f"Authentication-Results: {GATEWAY}; dkim=pass header.d=bank.test\r\n"
           "Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=x@elsewhere.test\r\n").encode() + raw
    raw = signed(signed(raw, RSA, "rsa", AUTH_DOMAIN), ED25519, "ed", AUTH_DOMAIN)
    code, reply = _send(gateway, raw, f"alice@{AUTH_DOMAIN}", AUTH_SENDER_IP, f"mail.{AUTH_DOMAIN}")
    assert code == 250, reply
    verdict = _verdict(gateway, reply.decode().rsplit(" ", 1)[1])
    assert verdict.action == "deliver"
    assert (_results(verdict, "spf"), _results(verdict, "dkim"), _results(verdict, "dmarc")) == (
        ["SPF_PASS", "SPF_HELO_PASS"], ["DKIM_PASS", "DKIM_PASS"], ["DMARC_PASS"])

    [delivered] = gateway.downstream.wait_for(lambda d: subject in d.text, what="the signed message")
    ours, theirs = _auth_results(delivered.content)
    assert ours == " ".join(verdict.authentication_results.split())
    assert ours.startswith(f"{GATEWAY}; spf=pass smtp.mailfrom=alice@{AUTH_DOMAIN}; "
                           f"spf=pass smtp.helo=mail.{AUTH_DOMAIN}; dkim=pass header.d={AUTH_DOMAIN} header.s=ed "
                           "header.a=ed25519-sha256 header.b=")
    assert f"dkim=pass header.d={AUTH_DOMAIN} header.s=rsa header.a=rsa-sha256" in ours
    assert f"dmarc=pass (p=reject dis=none) header.from={AUTH_DOMAIN}; arc=none smtp.remote-ip={AUTH_SENDER_IP}" \
        in ours
    assert theirs == "mx.elsewhere.test; spf=pass smtp.mailfrom=x@elsewhere.test"
    assert "bank.test" not in delivered.text
    # Added above the message, below the gateway's Received, and the
    # signatures still verify for the downstream.
    assert delivered.content.startswith(b"Received: ")
    assert delivered.content.index(b"Authentication-Results: " + GATEWAY.encode()) < \
        delivered.content.index(b"DKIM-Signature")
    lookup = KeyLookup(blocking_resolver_for(gateway.nsd.address))
    assert dkim.verify(delivered.content, dnsfunc=lookup)


def test_a_forgery_of_a_p_reject_domain_is_refused_inline(gateway):
    subject = _subject("forged")
    raw = make_email(f"CEO <ceo@{AUTH_DOMAIN}>", subject, to=RCPT, body="Wire the money today.\n")
    code, reply = _send(gateway, raw, f"ceo@{AUTH_DOMAIN}", "127.0.2.202", "client.test")
    assert code == 550 and b"DMARC_FAIL_REJECT" in reply, reply
    refused = gateway.wait_records(
        lambda r: isinstance(r.event, ev.MessageRefused) and "DMARC_FAIL_REJECT" in r.event.reasons,
        [VERDICTS.name], what="message.refused")
    verdict = _verdict(gateway, max(refused, key=lambda r: r.event.occurred_at).event.message_id)
    assert "dmarc=fail (p=reject dis=reject) header.from=auth-test.test policy.dmarc=reject" in \
        " ".join(verdict.authentication_results.split())
    assert "SPF_FAIL" in _results(verdict, "spf")
    assert not gateway.downstream.matching(lambda d: subject in d.text)


def test_a_forgery_under_p_quarantine_is_held(gateway):
    subject = _subject("quarantine")
    raw = make_email(f"billing@q.{AUTH_DOMAIN}", subject, to=RCPT)
    code, reply = _send(gateway, raw, f"billing@q.{AUTH_DOMAIN}", "127.0.2.204", "client.test")
    assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [held] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                                  keys={queue_id}, timeout=60, what="quarantine.added")
    assert held.event.reasons == ["DMARC_FAIL_QUARANTINE"]


def test_mail_relayed_by_the_trusted_list_passes_on_its_arc_chain(gateway):
    subject = _subject("via the list")
    original = signed(make_email(f"alice@{AUTH_DOMAIN}", subject, to=RCPT), RSA, "rsa", AUTH_DOMAIN)
    raw = forwarded(original, FORWARDER_DOMAIN, ARC_TRUSTED,
                    f"spf=pass smtp.mailfrom=alice@{AUTH_DOMAIN}; dkim=pass header.d={AUTH_DOMAIN}; "
                    f"dmarc=pass header.from={AUTH_DOMAIN}")
    code, reply = _send(gateway, raw, f"list-bounces@{FORWARDER_DOMAIN}", FORWARDER_IP, FORWARDER_DOMAIN)
    assert code == 250, reply
    verdict = _verdict(gateway, reply.decode().rsplit(" ", 1)[1])
    assert (_results(verdict, "dkim"), _results(verdict, "arc"), _results(verdict, "dmarc")) == (
        ["DKIM_FAIL"], ["ARC_PASS"], ["DMARC_TRUSTED_FORWARDER"])
    assert verdict.action == "deliver"
    [delivered] = gateway.downstream.wait_for(lambda d: subject in d.text, what="the list's copy")
    ours = _auth_results(delivered.content)[0]
    assert f"arc=pass (i=1 {FORWARDER_DOMAIN}) smtp.remote-ip={FORWARDER_IP}" in ours
    assert f'reason="trusted forwarder {FORWARDER_DOMAIN} (ARC i=1) saw' in ours


def test_internet_mail_forging_the_local_domain_is_refused_inline(gateway):
    raw = make_email(f"The Boss <boss@{LOCAL_DOMAIN}>", _subject("local forgery"), to=RCPT)
    code, reply = _send(gateway, raw, f"mallory@{AUTH_DOMAIN}", "127.0.2.205", "client.test")
    assert code == 550 and b"LOCAL_DOMAIN_SPOOFED" in reply, reply


def test_a_listed_person_s_name_from_an_outside_address_is_held(gateway):
    raw = make_email("Cora Chief <cora.chief@partner.test>", _subject("impersonation"), to=RCPT)
    code, reply = _send(gateway, raw, "cora.chief@partner.test", "127.0.2.206", "client.test")
    assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [held] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                                  keys={queue_id}, timeout=60, what="quarantine.added")
    assert held.event.reasons == ["DISPLAY_NAME_IMPERSONATION"]

"""Outbound mail through the whole stack: MX routing from NSD, TLS recorded, REQUIRETLS, null MX.

The organisation's mail server (127.0.0.10, a trusted address) sends through
ingest, the streams and the delivery sink to another organisation whose MX
records NSD serves (conftest.remote_zone); its mail servers are aiosmtpd
receivers on 127.0.1.50 and .51. tests/test_outbound_delivery.py covers the
delivery sink's TLS policies in detail; this proves them end to end.
"""

from __future__ import annotations

import ssl
import time
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

import pytest

from schemas import events as ev
from schemas.topics import DELIVERIES
from tests.outbound_servers import Authority, Receiver

from .conftest import LOCAL_DOMAIN, REMOTE_DOMAIN, REMOTE_MX, TRUSTED_SERVER_IP
from .policy_helpers import apply


@pytest.fixture(scope="module")
def mx2(gateway, tmp_path_factory):
    """The partner's second MX, with STARTTLS on a certificate the gateway cannot validate."""
    ca = Authority(tmp_path_factory.mktemp("partner-ca"), "Partner's private CA")
    receiver = Receiver(REMOTE_MX["mx2"], gateway.mx_port, tls=ca.context(f"mx2.{REMOTE_DOMAIN}")).start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def mx_routing(gateway, mx2, tmp_path_factory):
    """The test policy without its smarthost, so other domains are found by MX; then the original again."""
    original = Path(gateway.settings.policy_path)
    changed = tmp_path_factory.mktemp("mx-policy") / "policy.yaml"
    changed.write_text("\n".join(line for line in original.read_text().splitlines() if "smarthost:" not in line))
    apply(gateway, changed)
    try:
        # The delivery sink follows the policy too: a probe reaching the MX says it does.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            send_from_the_organisation(gateway, f"probe@{LOCAL_DOMAIN}", f"probe@{REMOTE_DOMAIN}", "mx probe")
            if _wait(lambda: [m for m in mx2.messages() if b"mx probe" in m.content], 5):
                break
        else:
            raise AssertionError("the delivery sink never routed by MX")
        yield
    finally:
        apply(gateway, original)


def _wait(found, timeout: float):
    deadline = time.monotonic() + timeout
    while not (result := found()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


def send_from_the_organisation(gateway, sender: str, rcpt: str, subject: str, requiretls: bool = False) -> str:
    msg = gateway.message(sender, [rcpt], subject)
    with gateway.smtp(TRUSTED_SERVER_IP) as client:
        client.ehlo("mail.example.test")
        if requiretls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("mail.example.test")
        code, reply = client.mail(sender, ["REQUIRETLS"] if requiretls else [])
        assert code == 250, reply
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
        code, reply = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def attempts(gateway, message_id: str) -> list[ev.DeliveryAttempted]:
    return [r.event for r in gateway.records([DELIVERIES.name], keys={message_id})
            if isinstance(r.event, ev.DeliveryAttempted)]


def test_mail_to_another_domain_goes_to_its_mx_in_order_and_records_its_tls(gateway, mx2, mx_routing):
    # mx1 (preference 10) is down: the sink goes on to mx2 in the same attempt.
    message_id = send_from_the_organisation(gateway, f"alice@{LOCAL_DOMAIN}", f"bob@{REMOTE_DOMAIN}", "via mx2")
    received = _wait(lambda: [m for m in mx2.messages() if b"via mx2" in m.content], 60)
    assert len(received) == 1, [r.event for r in gateway.records(keys={message_id})]
    [received] = received
    assert received.rcpt_to == [f"bob@{REMOTE_DOMAIN}"] and received.tls is not None
    tried = gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryAttempted)
                                 and r.event.recipients[0].outcome == "delivered",
                                 [DELIVERIES.name], keys={message_id}, what="the delivered attempt")
    found = attempts(gateway, message_id)
    assert [a.mx_host for a in found] == [f"mx1.{REMOTE_DOMAIN}", f"mx2.{REMOTE_DOMAIN}"]
    assert found[0].tls is None and found[0].recipients[0].outcome == "deferred"
    tls = tried[0].event.tls
    assert (tls.policy, tls.verified) == ("opportunistic", False) and tls.version and tls.verify_error


def _dsn_for(gateway, message_id: str, sender: str):
    found = gateway.downstream.wait_for(
        lambda d: d.mail_from == "" and d.rcpt_to == [sender] and message_id.encode() in d.content,
        timeout=60, what=f"the DSN for {message_id}")
    return BytesParser(policy=default).parsebytes(found[0].content)


def test_requiretls_to_a_domain_without_mta_sts_bounces_with_5_7_30_and_is_never_sent(gateway, mx2, mx_routing):
    sender = f"carol@{LOCAL_DOMAIN}"
    before = len(mx2.messages())
    message_id = send_from_the_organisation(gateway, sender, f"dave@{REMOTE_DOMAIN}", "must be secret",
                                            requiretls=True)
    dsn = _dsn_for(gateway, message_id, sender)
    assert "5.7.30" in dsn.as_string()
    assert len(mx2.messages()) == before and not [m for m in mx2.messages() if b"must be secret" in m.content]


def test_a_domain_with_a_null_mx_bounces_at_once(gateway, mx_routing):
    sender = f"erin@{LOCAL_DOMAIN}"
    message_id = send_from_the_organisation(gateway, sender, f"frank@null.{REMOTE_DOMAIN}", "to nowhere")
    dsn = _dsn_for(gateway, message_id, sender)
    assert "5.1.10" in dsn.as_string()
    assert attempts(gateway, message_id) == []  # no connection was made

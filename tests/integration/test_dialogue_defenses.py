"""Relay control, IP Shielding, Location Screening, block lists and session
limits, over real SMTP from several 127.0.0.x addresses."""

from __future__ import annotations

import smtplib

import pytest

from schemas import events as ev
from schemas.topics import SESSIONS

from .conftest import LOCAL_DOMAIN, TRUSTED_SERVER_IP
from .policy_helpers import applied_policy
from .test_auth_tls import auth_plain, submission, tls_context

pytestmark = pytest.mark.integration


def session_events(gateway, ip: str, kind, predicate=lambda e: True, what="events"):
    return [r.event for r in gateway.wait_records(
        lambda r: isinstance(r.event, kind) and predicate(r.event), [SESSIONS.name], keys={ip}, what=what)]


@pytest.mark.parametrize("ip, path, reason", [
    ("127.0.5.1", f"<user%elsewhere.test@{LOCAL_DOMAIN}>", "relay attempt: percent hack"),
    ("127.0.5.2", f"<elsewhere.test!user@{LOCAL_DOMAIN}>", "relay attempt: bang path"),
    ("127.0.5.3", f"<@hop.test:user@{LOCAL_DOMAIN}>", "relay attempt: source route"),
    ("127.0.5.4", f'<"user@elsewhere.test"@{LOCAL_DOMAIN}>', "relay attempt: quoted local part containing @"),
    ("127.0.5.5", f"<user@elsewhere.test@{LOCAL_DOMAIN}>", "relay attempt: several @"),
    ("127.0.5.6", "<user@[192.0.2.1]>", "relay attempt: address literal"),
    ("127.0.5.7", "<victim@elsewhere.test>", "relay denied"),
])
def test_relay_smuggling_is_refused_at_rcpt_with_the_reason(gateway, ip, path, reason):
    with gateway.smtp(ip) as client:
        client.ehlo("client.test")
        assert client.mail("someone@partner.test")[0] == 250
        code, reply = client.docmd("RCPT", f"TO:{path}")
        assert 500 <= code < 600, (code, reply)
        assert client.rcpt(f"fine@{LOCAL_DOMAIN}")[0] == 250  # the session goes on
    [refused] = session_events(gateway, ip, ev.SessionRcpt, lambda e: not e.accepted, what="refused RCPT")
    assert refused.reason == reason and refused.reply_code == code
    assert refused.policy_version


def test_local_sender_from_a_non_server_address_must_authenticate(gateway):
    with gateway.smtp("127.0.5.10") as client:
        client.ehlo("client.test")
        code, reply = client.mail(f"ceo@{LOCAL_DOMAIN}")
        assert code == 530 and reply.startswith(b"5.7.0 Authentication required")
    [mail] = session_events(gateway, "127.0.5.10", ev.SessionMail)
    assert not mail.accepted and "not a domain mail server" in mail.reason


def test_ip_shielding_refuses_a_forged_local_sender_from_the_wrong_address(gateway, tmp_path):
    shielding = f"""
ip_shielding:
  pairs:
    - {{domain: $LOCALDOMAIN$, ip: {TRUSTED_SERVER_IP}, comment: the domain mail server}}
    - {{domain: $LOCALDOMAIN$, ip: 127.0.5.21, comment: printer, send_without_auth: true}}
"""
    with applied_policy(gateway, tmp_path, shielding):
        with gateway.smtp("127.0.5.20") as client:
            client.ehlo("client.test")
            code, reply = client.mail(f"ceo@{LOCAL_DOMAIN}")
            assert code == 550 and b"IP Shielding" in reply and b"rules #1, #2" in reply
        [mail] = session_events(gateway, "127.0.5.20", ev.SessionMail)
        assert mail.reason.startswith(f"ip shielding: from {LOCAL_DOMAIN} not from 127.0.5.20")

        # From the right addresses: the domain mail server, and the printer
        # that may send without AUTH.
        gateway.send(gateway.message(f"ceo@{LOCAL_DOMAIN}", ["partner@partner.test"], "shielded ok"),
                     source_ip=TRUSTED_SERVER_IP)
        gateway.downstream.wait_for(lambda d: "shielded ok" in d.text)
        with gateway.smtp("127.0.5.21") as client:
            client.ehlo("printer.test")
            code, _ = client.mail(f"ceo@{LOCAL_DOMAIN}")
        # Not asked to authenticate; only told that no such local account exists.
        [printer] = session_events(gateway, "127.0.5.21", ev.SessionMail)
        assert code == 550 and printer.reason == "local sender does not exist"

        # The From header is checked too, at the end of DATA.
        forged = gateway.message("news@partner.test", [f"staff@{LOCAL_DOMAIN}"], "forged header")
        forged.replace_header("From", f"The CEO <ceo@{LOCAL_DOMAIN}>")
        with gateway.smtp("127.0.5.22") as client:
            client.ehlo("client.test")
            client.mail("news@partner.test")
            client.rcpt(f"staff@{LOCAL_DOMAIN}")
            code, reply = client.data(forged.as_bytes())
            assert code == 550 and b"From header" in reply
        [data] = session_events(gateway, "127.0.5.22", ev.SessionData)
        assert not data.accepted and data.reason.startswith("ip shielding: with a From header in")


def test_location_screening_refuses_connections_and_separately_only_auth(gateway, tmp_path):
    from tests.geodb import write_country_db

    db = write_country_db(tmp_path / "countries.mmdb", {"127.0.5.40/32": "KP", "127.0.5.41/32": "RU"})
    screening = f"""
location_screening:
  enabled: true
  database: {db}
  refuse_connections_from: [KP]
  refuse_auth_from: [RU]
"""
    with applied_policy(gateway, tmp_path, screening) as version:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            gateway.smtp("127.0.5.40")
        assert refused.value.smtp_code == 554 and b"(KP)" in refused.value.smtp_error
        [event] = session_events(gateway, "127.0.5.40", ev.SessionRefused)
        assert event.phase == "connect" and event.reason == "location screening: connection from KP"
        assert event.policy_version == version

        # From RU the session is served, but AUTH (over TLS on submission) is refused.
        with gateway.smtp("127.0.5.41") as client:
            assert client.ehlo("client.test")[0] == 250
        with submission(gateway, "127.0.5.41") as client:
            client.starttls(context=tls_context(gateway))
            client.ehlo("client.test")
            code, reply = auth_plain(client, f"someone@{LOCAL_DOMAIN}", "Any-Password-Here-42")
            assert code == 554 and b"(RU)" in reply
        [auth] = session_events(gateway, "127.0.5.41", ev.SessionAuth)
        assert auth.outcome == "failure" and auth.reason == "location screening: AUTH from RU"


def test_block_list_refuses_a_client_at_connect(gateway, tmp_path):
    with applied_policy(gateway, tmp_path, "block_list:\n  addresses: [127.0.5.50]\n  domains: [spam.test]\n"):
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            gateway.smtp("127.0.5.50")
        assert refused.value.smtp_code == 554
        with gateway.smtp("127.0.5.51") as client:
            client.ehlo("client.test")
            code, _ = client.mail("offers@spam.test")
            assert code == 550
    [event] = session_events(gateway, "127.0.5.50", ev.SessionRefused)
    assert event.reason == "block list: address 127.0.5.50/32"


def test_session_limits_give_the_right_codes_and_record_why(gateway, tmp_path):
    limits = """
max_message_bytes: 4000
session_limits:
  max_recipients_per_message: 2
  max_commands_per_session: 12
  max_duration_seconds: 8
"""
    with applied_policy(gateway, tmp_path, limits):
        with gateway.smtp("127.0.5.60") as client:
            client.ehlo("client.test")
            assert client.has_extn("size") and client.esmtp_features["size"] == "4000"
            code, reply = client.docmd("MAIL", "FROM:<big@partner.test> SIZE=9000")
            assert code == 552 and reply.startswith(b"5.3.4")
            client.mail("a@partner.test")
            assert client.rcpt(f"one@{LOCAL_DOMAIN}")[0] == 250
            assert client.rcpt(f"two@{LOCAL_DOMAIN}")[0] == 250
            code, reply = client.rcpt(f"three@{LOCAL_DOMAIN}")
            assert code == 452 and reply.startswith(b"4.5.3")
            code, reply = client.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100)
            assert code == 552 and reply.startswith(b"5.3.4")
        [at_data] = session_events(gateway, "127.0.5.60", ev.SessionRefused, lambda e: e.phase == "DATA")
        assert at_data.reply_code == 552 and at_data.reason == "session limit: message over 4000 bytes"
        [at_mail] = session_events(gateway, "127.0.5.60", ev.SessionRefused, lambda e: e.phase == "MAIL")
        assert at_mail.reply_code == 552 and at_mail.reason == "session limit: declared SIZE over 4000 bytes"
        [rcpt] = session_events(gateway, "127.0.5.60", ev.SessionRcpt, lambda e: not e.accepted)
        assert rcpt.reason == "session limit: more than 2 recipients per message"

        with gateway.smtp("127.0.5.61") as client:
            client.ehlo("client.test")
            codes = [client.noop()[0] for _ in range(12)]  # EHLO and 11 NOOPs make 12 commands
            assert codes == [250] * 11 + [421]
        [over] = session_events(gateway, "127.0.5.61", ev.SessionRefused)
        assert over.reply_code == 421 and over.reason == "session limit: more than 12 commands"

        with gateway.smtp("127.0.5.62") as client:
            client.ehlo("client.test")
            # Say nothing: the gateway ends the session itself.
            client.sock.settimeout(30)
            line = client.file.readline()
            assert line.startswith(b"421 4.4.2"), line
        [ended] = session_events(gateway, "127.0.5.62", ev.SessionRefused)
        assert ended.phase == "session" and ended.reason == "session limit: open longer than 8 seconds"

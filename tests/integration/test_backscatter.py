"""Backscatter Protection end to end: signed return paths, forged bounces refused."""

from __future__ import annotations

import re

import pytest

from schemas import events as ev
from schemas.topics import SESSIONS

from .conftest import LOCAL_DOMAIN, TRUSTED_SERVER_IP

pytestmark = pytest.mark.integration

INTERNET_IP = "127.0.0.40"


def _bounce(gateway, rcpt: str, subject: str, sender: str = "", headers: dict | None = None):
    """Send a returned message (from the null sender, unless given) as a remote MTA would."""
    msg = gateway.message("MAILER-DAEMON@partner.test", [rcpt], subject)
    for name, value in (headers or {}).items():
        msg[name] = value
    with gateway.smtp(INTERNET_IP) as client:
        client.ehlo("mx.partner.test")
        code, reply = client.mail(sender)
        assert code == 250, (code, reply)
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


def _send_outbound(gateway, sender: str, subject: str) -> str:
    gateway.send(gateway.message(sender, ["someone@partner.test"], subject), source_ip=TRUSTED_SERVER_IP)
    [out] = gateway.downstream.wait_for(lambda d: subject in d.text and d.rcpt_to == ["someone@partner.test"])
    return out.mail_from


def test_outgoing_mail_is_signed_and_a_genuine_bounce_is_delivered_untagged(gateway):
    sender = f"alice@{LOCAL_DOMAIN}"
    return_path = _send_outbound(gateway, sender, "signed outbound")
    assert re.fullmatch(rf"prvs=\d\d{{3}}[0-9a-f]{{6}}={sender}", return_path), return_path

    code, reply = _bounce(gateway, return_path, "genuine bounce")
    assert code == 250, reply
    [bounce] = gateway.downstream.wait_for(lambda d: "genuine bounce" in d.text)
    assert bounce.rcpt_to == [sender] and bounce.mail_from == ""


def test_forged_bounce_without_a_signature_is_refused_and_recorded(gateway):
    code, reply = _bounce(gateway, f"bob@{LOCAL_DOMAIN}", "forged bounce")
    assert code == 550 and b"Backscatter Protection" in reply
    [flag] = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionFlagged), [SESSIONS.name],
                                  keys={INTERNET_IP})
    assert flag.event.reason == "backscatter: missing return-path signature"
    refused = gateway.wait_records(
        lambda r: isinstance(r.event, ev.SessionRcpt) and not r.event.accepted
        and r.event.recipient == f"bob@{LOCAL_DOMAIN}", [SESSIONS.name], keys={INTERNET_IP})
    assert refused[0].event.reply_code == 550
    assert not gateway.downstream.matching(lambda d: "forged bounce" in d.text)


def test_a_tampered_signature_is_refused(gateway):
    return_path = _send_outbound(gateway, f"carol@{LOCAL_DOMAIN}", "to be tampered")
    tampered = return_path.replace("=carol@", "=dave@")
    code, _ = _bounce(gateway, tampered, "tampered bounce")
    assert code == 550


def test_auto_reply_to_an_unsigned_address_is_refused_at_end_of_data(gateway):
    code, reply = _bounce(gateway, f"erin@{LOCAL_DOMAIN}", "Out of office", sender="vacation@partner.test",
                          headers={"Auto-Submitted": "auto-replied"})
    assert code == 550, reply
    assert not gateway.downstream.matching(lambda d: "Out of office" in d.text)


def test_after_rotation_new_mail_uses_the_new_key_and_old_signatures_still_verify(gateway):
    before = _send_outbound(gateway, f"frank@{LOCAL_DOMAIN}", "before rotation")
    out = gateway.cli("backscatter", "rotate-key", "--by", "admin").stdout
    new_key = re.search(r"key (\d)", out).group(1)
    # The gateway follows the key topic; allow a moment for it to arrive.
    import time

    deadline = time.monotonic() + 30
    while True:
        after = _send_outbound(gateway, f"frank@{LOCAL_DOMAIN}", f"after rotation {time.monotonic()}")
        if after[5] == new_key or time.monotonic() > deadline:
            break
    assert after[5] == new_key and before[5] != new_key
    code, reply = _bounce(gateway, before, "bounce of a message signed before the rotation")
    assert code == 250, reply

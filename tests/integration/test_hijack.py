"""Account Hijack Detection end to end: accounts sending over their limit through
the submission listener, the Faust worker counting, ingest enforcing, the
delivery sink notifying the administrator.

The test policy allows no more than 12 messages in 10 minutes. Each test has
its own account and client address (127.0.0.61-62).
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas import events as ev
from schemas.topics import ACCOUNT_STATE, HIJACK_LIMITS

from .abuse_helpers import auth_plain, get_json, submissions, wait_for, web_url
from .conftest import LOCAL_DOMAIN
from .policy_helpers import apply, wait_until_streams_use

pytestmark = pytest.mark.integration

PASSWORD = "Copper-Meadow-Sextant-58"
LIMIT = 12


def add_account(gateway, address: str, ip: str) -> None:
    result = subprocess.run([sys.executable, "-m", "bulwark.cli", "accounts", "add", address, "--password-stdin"],
                            env=gateway.stack.env, input=PASSWORD + "\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    def can_log_in():
        with submissions(gateway, ip) as client:
            client.ehlo("mua.test")
            return auth_plain(client, address, PASSWORD)[0] == 235
    wait_for(f"ingest knows {address}", can_log_in)


def logged_in(gateway, address: str, ip: str) -> smtplib.SMTP_SSL:
    client = submissions(gateway, ip)
    client.ehlo("mua.test")
    code, reply = auth_plain(client, address, PASSWORD)
    assert code == 235, reply
    return client


def send(client: smtplib.SMTP, sender: str, n: int) -> tuple[int, bytes]:
    """MAIL FROM and, when accepted, a whole message; the MAIL reply."""
    code, reply = client.mail(sender)
    if code != 250:
        return code, reply
    assert client.rcpt(f"bob@{LOCAL_DOMAIN}")[0] == 250
    body = f"From: {sender}\r\nTo: bob@{LOCAL_DOMAIN}\r\nSubject: hijack test {n}\r\n\r\nmessage {n}\r\n"
    assert client.data(body.encode())[0] == 250
    return code, reply


def account_table(gateway, address: str) -> dict | None:
    return get_json(f"{web_url(gateway)}/hijack/account/{address}/")


def test_account_over_its_limit_gets_452(gateway):
    address, ip = f"busy@{LOCAL_DOMAIN}", "127.0.0.61"
    add_account(gateway, address, ip)
    with logged_in(gateway, address, ip) as client:
        for n in range(LIMIT):
            assert send(client, address, n)[0] == 250
        # The streams count the 12th and publish the limit; ingest enforces it.
        gateway.wait_records(lambda r: isinstance(r.event, ev.AccountLimitReached), [HIJACK_LIMITS.name],
                             keys={address}, what="the limit reached")
        code, reply = wait_for("the 13th refused", lambda: (r := send(client, address, 99))[0] != 250 and r)
    assert code == 452 and b"limit of 12 messages in 10 minutes" in reply

    answer = account_table(gateway, address)
    assert answer["messages"] == LIMIT and answer["client_ips"] == [ip]
    assert answer["limit_reached"]["messages"] == LIMIT and answer["state"] is None  # not disabled
    human = gateway.cli("tables", "account", address).stdout
    assert f"{address}: {LIMIT} messages (no more than {LIMIT})" in human and "452 until" in human


def test_disabling_drops_the_session_notifies_and_enable_restores(gateway, tmp_path):
    address, ip = f"hijacked@{LOCAL_DOMAIN}", "127.0.0.62"
    add_account(gateway, address, ip)
    policy = yaml.safe_load(Path(gateway.settings.policy_path).read_text())
    policy["hijack"]["disable_account"] = True
    disabling = tmp_path / "policy-disabling.yaml"
    disabling.write_text(yaml.safe_dump(policy))
    wait_until_streams_use(gateway, apply(gateway, disabling))
    try:
        client = logged_in(gateway, address, ip)
        for n in range(LIMIT):
            assert send(client, address, n)[0] == 250
        [changed] = gateway.wait_records(lambda r: isinstance(r.event, ev.AccountStateChanged) and not r.event.enabled,
                                         [ACCOUNT_STATE.name], keys={address}, what="the account disabled",
                                         timeout=90)
        assert changed.event.by == "account-hijack-detection"
        assert changed.event.details["messages"] == LIMIT and changed.event.details["client_ips"] == [ip]

        # The session is refused with 5xx at its next message and dropped.
        code, reply = wait_for("mail refused", lambda: (r := send(client, address, 99))[0] != 250 and r)
        assert code == 550 and b"disabled" in reply
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            client.noop()
        # AUTH is refused before the password is checked, and the session dropped.
        with submissions(gateway, ip) as again:
            again.ehlo("mua.test")
            code, reply = auth_plain(again, address, PASSWORD)
            assert code == 525 and b"disabled" in reply
            with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
                again.noop()

        # The administrator is told: the account, the counts, the window, the clients.
        [note] = gateway.downstream.wait_for(
            lambda d: f"Account Hijack Detection: {address} disabled" in d.text, timeout=60,
            what="the administrator's notification")
        assert note.rcpt_to == [f"postmaster@{LOCAL_DOMAIN}"]
        assert f"Messages sent:   {LIMIT} (no more than {LIMIT} allowed)" in note.text
        assert "10 minutes" in note.text and ip in note.text

        disabled = wait_for("listed as disabled", lambda: [s for s in get_json(f"{web_url(gateway)}/hijack/disabled/")["items"]
                                                            if s["address"] == address])
        assert disabled[0]["by"] == "account-hijack-detection"
        assert address in gateway.cli("tables", "disabled").stdout
        assert json.loads(gateway.cli("tables", "account", address, "--json").stdout)["state"]["enabled"] is False

        # `bulwark accounts enable` restores it, and the count starts again.
        gateway.cli("accounts", "enable", address)

        def can_send():
            with submissions(gateway, ip) as c:
                c.ehlo("mua.test")
                if auth_plain(c, address, PASSWORD)[0] != 235:
                    return False
                return send(c, address, 100)[0] == 250
        wait_for("the account enabled again", can_send)
        answer = wait_for("count restarted", lambda: (a := account_table(gateway, address)) and a["state"]["enabled"] and a)
        assert answer["messages"] <= 1
    finally:
        wait_until_streams_use(gateway, apply(gateway, gateway.settings.policy_path))

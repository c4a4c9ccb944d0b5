"""Dynamic Screening end to end: real SMTP clients from their own loopback
addresses, the real broker, the Faust worker counting, ingest enforcing.

The test policy (conftest.write_policy) bans after 6 failed AUTH, 20 failed
RCPTs or more than 30 connections in 5 minutes, for 1 minute, and
allow-lists 127.0.0.60. Each test uses its own addresses in 127.0.0.50-79.
"""

from __future__ import annotations

import json
import smtplib
import time
from datetime import datetime, timezone

import pytest

from schemas import events as ev
from schemas.topics import BANS

from .abuse_helpers import (auth_plain, ban_on_topic, close_quietly, connect_refusal, counters, failed_rcpts,
                            get_json, submissions, wait_for, web_url)
from .conftest import SCREENING_ALLOW_LISTED_IP

pytestmark = pytest.mark.integration


def next_command_closes(client: smtplib.SMTP) -> tuple[int, bytes]:
    """NOOP until the gateway answers 421 and closes (once the ban reaches ingest)."""
    def probe():
        code, reply = client.noop()
        return (code, reply) if code == 421 else None
    code, reply = wait_for("the open session closed", probe, interval=0.1)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, OSError)):
        client.noop()
    return code, reply


def test_password_guessing_client_is_banned_and_its_open_session_closed(gateway):
    ip = "127.0.0.50"
    client = submissions(gateway, ip)
    client.ehlo("guesser.test")
    for attempt in range(6):
        code, _ = auth_plain(client, "alice@example.test", f"Guess-{attempt}-Password")
        assert code == 535
    code, reply = next_command_closes(client)
    assert b"banned by Dynamic Screening" in reply and b"6 failed AUTH attempts" in reply

    ban = ban_on_topic(gateway, ip)
    assert ban.counters["failed_auth"] == 6
    assert (ban.expires_at - ban.occurred_at).total_seconds() == 60
    # A new connection is refused before the banner, on any listener.
    code, reply = connect_refusal(gateway, ip)
    assert code == 421 and b"banned by Dynamic Screening" in reply
    refused = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionRefused) and r.event.phase == "connect",
                                   ["smtp.sessions"], keys={ip})
    assert refused[-1].event.reason.startswith("Dynamic Screening ban")


def test_client_failing_rcpts_is_banned(gateway):
    ip = "127.0.0.51"
    client = failed_rcpts(gateway, ip, 20)
    code, reply = next_command_closes(client)
    assert b"20 failed RCPTs" in reply
    ban = ban_on_topic(gateway, ip)
    assert ban.counters["failed_rcpt"] == 20 and "20 failed RCPTs in 5 minutes" in ban.reason
    assert connect_refusal(gateway, ip)[0] == 421


def test_client_connecting_too_often_is_banned(gateway):
    ip = "127.0.0.52"
    for _ in range(31):  # more than 30 in 5 minutes
        refusal = connect_refusal(gateway, ip)
        if refusal is not None:  # the ban may already be there for the last few
            break
    refusal = wait_for("connections refused", lambda: connect_refusal(gateway, ip))
    assert refusal[0] == 421 and b"connections" in refusal[1]
    assert ban_on_topic(gateway, ip).counters["connections"] == 31


def test_ban_expires_and_the_client_can_connect_again(gateway):
    ip = "127.0.0.53"
    close_quietly(failed_rcpts(gateway, ip, 20))
    ban = ban_on_topic(gateway, ip)
    assert wait_for("refused while banned", lambda: connect_refusal(gateway, ip))[0] == 421
    # Nothing lifts it: it ends at its expiry (one minute in the test policy).
    wait = (ban.expires_at - datetime.now(timezone.utc)).total_seconds()
    time.sleep(max(0.0, wait) + 0.5)
    assert connect_refusal(gateway, ip) is None
    with gateway.smtp(ip) as client:
        client.ehlo("reformed.test")
        assert client.mail("someone@partner.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250


def test_allow_listed_client_is_never_banned(gateway):
    ip = SCREENING_ALLOW_LISTED_IP
    close_quietly(failed_rcpts(gateway, ip, 25))
    for _ in range(35):
        assert connect_refusal(gateway, ip) is None
    # A ban earned afterwards by another client has gone through: the
    # allow-listed client's events were processed before it, and earned none.
    close_quietly(failed_rcpts(gateway, "127.0.0.54", 20))
    ban_on_topic(gateway, "127.0.0.54")
    assert not [r for r in gateway.records([BANS.name], keys={ip})]
    assert connect_refusal(gateway, ip) is None
    assert counters(gateway, ip)["counters"]["failed_rcpt"] == 0  # not even counted


def test_tables_over_http_and_cli_show_counters_and_bans(gateway):
    ip = "127.0.0.56"
    close_quietly(failed_rcpts(gateway, ip, 5))
    answer = wait_for("5 failed RCPTs counted",
                      lambda: (a := counters(gateway, ip)) and a["counters"]["failed_rcpt"] == 5 and a)
    assert answer["ban"] is None and answer["limits"]["failed_rcpt"] == 20
    assert answer["counters"]["connections"] == 1
    start = datetime.fromisoformat(answer["window"]["start"])
    end = datetime.fromisoformat(answer["window"]["end"])
    assert (end - start).total_seconds() == 300 and start <= datetime.now(timezone.utc) <= end

    out = gateway.cli("tables", "ip", ip, "--json").stdout
    assert json.loads(out)["counters"]["failed_rcpt"] == 5
    human = gateway.cli("tables", "ip", ip).stdout
    assert f"{ip}: window" in human and "failed_rcpt" in human and "not banned" in human

    banned = "127.0.0.57"
    close_quietly(failed_rcpts(gateway, banned, 20))
    ban = ban_on_topic(gateway, banned)
    listing = wait_for("the ban listed", lambda: [b for b in get_json(f"{web_url(gateway)}/screening/bans/")["items"]
                                                  if b["client_ip"] == banned])
    assert listing[0]["expires_at"].startswith(ban.expires_at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert banned in gateway.cli("tables", "bans").stdout
    assert json.loads(gateway.cli("tables", "ip", banned, "--json").stdout)["ban"]["reason"] == ban.reason

    # Lifting the ban early is an event; ingest lets the client in again.
    assert "lifted" in gateway.cli("screening", "unban", banned).stdout
    [lifted] = gateway.wait_records(lambda r: isinstance(r.event, ev.BanLifted), [BANS.name], keys={banned})
    wait_for("unbanned client greeted", lambda: connect_refusal(gateway, banned) is None)
    wait_for("ban gone from the table",
             lambda: banned not in json.loads(gateway.cli("tables", "bans", "--json").stdout or "[]").__str__())

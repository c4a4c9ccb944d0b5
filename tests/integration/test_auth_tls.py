"""SMTP AUTH, accounts and TLS, over real sockets against the real stack.

Submission (STARTTLS then AUTH) and submissions (implicit TLS) listeners,
local accounts made with `bulwark accounts`, REQUIRETLS, and the promise that
a password never reaches an event or a log.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import sys
import time

import pytest

from schemas import events as ev
from schemas.topics import ACCOUNTS, RECEIVED, SESSIONS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

ALICE = f"alice@{LOCAL_DOMAIN}"
ALICE_PASSWORD = "Violet-Harbor-Lantern-93"
WRONG_PASSWORD = "Wrong-Harbor-Guess-17"


def accounts_cli(gateway, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bulwark.cli", "accounts", *args], env=gateway.stack.env,
                          input=password + "\n" if password is not None else None, capture_output=True, text=True)


def tls_context(gateway) -> ssl.SSLContext:
    # The gateway's own self-signed certificate, verified like any other:
    # the tests check that it is the certificate served.
    context = ssl.create_default_context(cafile=str(gateway.settings.data_dir / "tls" / "selfsigned.crt"))
    return context


def submission(gateway, source_ip: str) -> smtplib.SMTP:
    return smtplib.SMTP(gateway.settings.smtp_host, gateway.settings.submission_port, timeout=60,
                        source_address=(source_ip, 0))


def submissions(gateway, source_ip: str) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(gateway.settings.smtp_host, gateway.settings.submissions_port, timeout=60,
                            source_address=(source_ip, 0), context=tls_context(gateway))


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {blob}")


@pytest.fixture(scope="module")
def alice(gateway) -> str:
    """A local account, known to ingest (its account view follows the topic)."""
    result = accounts_cli(gateway, "add", ALICE, "--password-stdin", password=ALICE_PASSWORD)
    assert result.returncode == 0, result.stderr
    # Ingest learns of the account moments after the CLI published it. Each
    # try comes from its own address so no client piles up failed attempts.
    deadline = time.monotonic() + 60
    for n in range(1, 250):
        with submissions(gateway, f"127.0.2.{n}") as client:
            client.ehlo("ready.test")
            if auth_plain(client, ALICE, ALICE_PASSWORD)[0] == 235:
                return ALICE
        assert time.monotonic() < deadline, "ingest never learnt of the new account"
        time.sleep(0.3)
    raise AssertionError("ingest never learnt of the new account")


def test_inbound_port_offers_starttls_and_requiretls_but_not_auth(gateway):
    with gateway.smtp("127.0.0.41") as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth") and not client.has_extn("requiretls")
        client.starttls(context=tls_context(gateway))
        client.ehlo("client.test")
        assert client.has_extn("requiretls")
        # Port 25 does not offer AUTH unless the policy says so.
        assert not client.has_extn("auth")
        code, reply = auth_plain(client, ALICE, ALICE_PASSWORD)
        assert code == 502 and b"5.5.1" in reply
    [starttls] = [r.event for r in gateway.wait_records(lambda r: isinstance(r.event, ev.SessionStartTls),
                                                        [SESSIONS.name], keys={"127.0.0.41"})]
    assert starttls.outcome == "success" and starttls.tls_version in ("TLSv1.2", "TLSv1.3")


def test_auth_before_tls_is_refused_on_submission(gateway):
    with submission(gateway, "127.0.0.42") as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # never offered in the clear
        code, reply = auth_plain(client, ALICE, ALICE_PASSWORD)
        assert (code, reply[:6]) == (538, b"5.7.11")
        # Submission takes no mail without AUTH.
        code, reply = client.mail(ALICE)
        assert (code, reply[:5]) == (530, b"5.7.0")
    [attempt] = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionAuth), [SESSIONS.name],
                                     keys={"127.0.0.42"})
    assert attempt.event.outcome == "failure" and attempt.event.reason == "TLS required"
    assert attempt.event.mechanism == "PLAIN"
    [connected] = [r.event for r in gateway.records([SESSIONS.name], keys={"127.0.0.42"})
                   if isinstance(r.event, ev.SessionConnected)]
    assert connected.listener == "submission"


def test_auth_over_starttls_on_submission_sends_as_the_account(gateway, alice):
    with submission(gateway, "127.0.0.43") as client:
        client.starttls(context=tls_context(gateway))
        client.ehlo("laptop.test")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.login(alice.upper(), ALICE_PASSWORD)[0] == 235  # logins are not case-sensitive
        msg = gateway.message(alice, ["bob@partner.test"], "submitted over starttls")
        client.send_message(msg)
    [delivered] = gateway.downstream.wait_for(lambda d: "submitted over starttls" in d.text)
    assert delivered.rcpt_to == ["bob@partner.test"]  # an authenticated user may send out
    [received] = gateway.wait_records(
        lambda r: r.event.envelope.mail_from == alice and r.event.envelope.rcpt_to == ["bob@partner.test"],
        [RECEIVED.name])
    assert received.event.envelope.authenticated_user == alice
    assert received.event.envelope.tls in ("TLSv1.2", "TLSv1.3")
    assert received.event.direction == "outbound"
    [auth] = [r.event for r in gateway.wait_records(lambda r: isinstance(r.event, ev.SessionAuth),
                                                    [SESSIONS.name], keys={"127.0.0.43"})]
    assert (auth.outcome, auth.mechanism, auth.username) == ("success", "PLAIN", alice.upper())


def test_auth_over_implicit_tls_with_login_mechanism(gateway, alice):
    with submissions(gateway, "127.0.0.44") as client:
        client.ehlo("phone.test")
        assert not client.has_extn("starttls")  # already encrypted
        assert client.has_extn("auth") and client.has_extn("requiretls")
        client.user, client.password = alice, ALICE_PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        code, reply = client.mail(alice)
        assert code == 250, reply
    [auth] = [r.event for r in gateway.wait_records(lambda r: isinstance(r.event, ev.SessionAuth),
                                                    [SESSIONS.name], keys={"127.0.0.44"})]
    assert (auth.outcome, auth.mechanism) == ("success", "LOGIN")


def test_wrong_password_is_refused_and_recorded_without_the_password(gateway, alice):
    with submissions(gateway, "127.0.0.45") as client:
        client.ehlo("client.test")
        code, reply = auth_plain(client, alice, WRONG_PASSWORD)
        assert (code, reply[:5]) == (535, b"5.7.8")
        code, _ = client.mail(alice)
        assert code == 530  # still not authenticated
    [attempt] = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionAuth), [SESSIONS.name],
                                     keys={"127.0.0.45"})
    assert (attempt.event.outcome, attempt.event.username, attempt.event.reason) == (
        "failure", alice, "invalid credentials")

    # Neither password nor the AUTH exchange is anywhere: not in any event on
    # any topic, not in any component's log.
    exchange = base64.b64encode(f"\0{alice}\0{WRONG_PASSWORD}".encode()).decode()
    secrets = [WRONG_PASSWORD, ALICE_PASSWORD, exchange, base64.b64encode(ALICE_PASSWORD.encode()).decode()]
    everything = "\n".join(r.event.model_dump_json() for r in gateway.records())
    logs = "\n".join(p.read_text(errors="replace") for p in gateway.stack.log_dir.glob("*.log"))
    for secret in secrets:
        assert secret not in everything
        assert secret not in logs
    # The account's record carries an Argon2id verifier, not the password.
    [account] = gateway.records([ACCOUNTS.name], keys={alice})
    assert account.event.password_hash.startswith("$argon2id$")


def test_weak_passwords_are_refused_with_the_reason(gateway):
    address = f"weak@{LOCAL_DOMAIN}"
    for password, why in [
        ("Sh0rt!x", "shorter than 12 characters"),
        ("password1234", "too easy to guess"),
        ("weak-Lantern-Harbor-81", "contains the account's name"),
        ("Example-Lantern-Harbor-81", "contains the account's domain"),
    ]:
        result = accounts_cli(gateway, "add", address, "--password-stdin", password=password)
        assert result.returncode == 2, (password, result.stdout, result.stderr)
        assert "password refused" in result.stderr and why in result.stderr, (password, result.stderr)
        assert password not in result.stderr + result.stdout
    listing = accounts_cli(gateway, "list")
    assert address not in listing.stdout


def test_accounts_cli_lists_disables_and_enables(gateway, alice):
    listing = accounts_cli(gateway, "list").stdout
    assert any(line.split()[:3] == [alice, "local", "enabled"] for line in listing.splitlines()), listing

    assert accounts_cli(gateway, "disable", alice, "--reason", "lost laptop").returncode == 0
    assert any(line.split()[:3] == [alice, "local", "disabled"] and "lost laptop" in line
               for line in accounts_cli(gateway, "list").stdout.splitlines())
    try:
        # A disabled account is told so (and its password is not tried).
        refused = None
        for n in range(1, 200):
            with submissions(gateway, f"127.0.3.{n}") as client:
                client.ehlo("client.test")
                code, reply = auth_plain(client, alice, ALICE_PASSWORD)
            if code != 235:
                refused = (code, reply)
                break
            time.sleep(0.3)
        assert refused is not None and refused[0] == 525 and b"5.7.13" in refused[1], refused
    finally:
        assert accounts_cli(gateway, "enable", alice).returncode == 0


def test_requiretls_is_accepted_only_over_tls_and_recorded(gateway):
    rcpt = f"carol@{LOCAL_DOMAIN}"
    with gateway.smtp("127.0.0.46") as client:
        client.ehlo("mta.partner.test")
        code, reply = client.mail("sender@partner.test", ["REQUIRETLS"])
        assert (code, reply[:5]) == (555, b"5.5.4")
        client.starttls(context=tls_context(gateway))
        client.ehlo("mta.partner.test")
        code, reply = client.mail("sender@partner.test", ["REQUIRETLS"])
        assert code == 250, reply
        assert client.rcpt(rcpt)[0] == 250
        msg = gateway.message("sender@partner.test", [rcpt], "requiretls please")
        code, reply = client.data(msg.as_bytes())
        assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [received] = gateway.wait_records(lambda r: True, [RECEIVED.name], keys={queue_id})
    assert received.event.envelope.requiretls is True
    assert received.event.envelope.tls in ("TLSv1.2", "TLSv1.3")

    # Mail without the parameter is not marked.
    with gateway.smtp("127.0.0.47") as client:
        client.starttls(context=tls_context(gateway))
        client.ehlo("mta.partner.test")
        client.mail("sender@partner.test")
        client.rcpt(rcpt)
        code, reply = client.data(gateway.message("sender@partner.test", [rcpt], "no requiretls").as_bytes())
    [plain] = gateway.wait_records(lambda r: True, [RECEIVED.name], keys={reply.decode().rsplit(" ", 1)[1]})
    assert plain.event.envelope.requiretls is False

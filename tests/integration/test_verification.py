"""User verification sources, through the running gateway on the real broker.

Every source type against a real server (slapd for LDAP and Active
Directory, an aiosmtpd domain mail server for the SMTP call-forward, the
HTTPS Microsoft 365 stub, the Minger responder): a valid recipient is
accepted and gets an account, an invalid one is refused 550 5.1.1, a source
that is down gives 4xx. Then default sources, automatic domain creation, the
cache, AUTH by LDAP bind, the CLI, and that no secret reaches an event or a
log.

Each test sends from its own loopback address so the failed RCPTs here never
add up to a Dynamic Screening ban of another test's client.
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import threading
import time

import pytest

from schemas import events as ev
from schemas.topics import ACCOUNTS, DOMAINS, SESSIONS

from .verification_servers import SECRETS

pytestmark = pytest.mark.integration

SENDER = "someone@partner.test"


def rcpt(gateway, address: str, source_ip: str) -> tuple[int, str]:
    """One session, one RCPT: the gateway's reply to it."""
    with gateway.smtp(source_ip) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, reply = client.rcpt(address)
    return code, reply.decode()


def rcpt_event(gateway, address: str, source_ip: str) -> ev.SessionRcpt:
    [record] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.SessionRcpt) and r.event.recipient == address,
        [SESSIONS.name], keys={source_ip}, what=f"session.rcpt for {address}")[-1:]
    return record.event


def account(gateway, address: str) -> ev.AccountRecorded:
    [record] = gateway.wait_records(lambda r: isinstance(r.event, ev.AccountRecorded), [ACCOUNTS.name],
                                    keys={address.lower()}, what=f"an account for {address}")[-1:]
    return record.event


def no_account(gateway, address: str) -> bool:
    return not gateway.records([ACCOUNTS.name], keys={address.lower()})


VALID = [
    pytest.param("corp-ldap", "alice.alias@ldap.example.test", "127.0.0.91", id="ldap-alternate-address"),
    pytest.param("corp-ad", "erin.alias@ad.example.test", "127.0.0.91", id="active-directory-proxyAddresses"),
    pytest.param("mailhost", "bob@smtp.example.test", "127.0.0.91", id="smtp-call-forward"),
    pytest.param("tenant", "henry.alias@m365.example.test", "127.0.0.91", id="m365-proxyAddresses"),
    pytest.param("mdaemon", "kim@minger.example.test", "127.0.0.91", id="minger"),
]


@pytest.mark.parametrize("source, address, source_ip", VALID)
def test_valid_recipient_is_accepted_and_gets_an_account(gateway, source, address, source_ip):
    msg = gateway.message(SENDER, [address], f"verified by {source}")
    # 250 to RCPT and to DATA: accepted and durable. (Delivery itself is
    # test_pipeline.py's; the route of a created domain is unit-tested.)
    gateway.send(msg, source_ip)

    created = account(gateway, address)
    assert created.source == source and created.password_hash is None
    event = rcpt_event(gateway, address, source_ip)
    assert event.accepted and event.verification is not None
    assert event.verification.result == "valid" and event.verification.source == source
    assert event.verification.account_created and not event.verification.cached
    assert event.verification.latency_ms > 0


INVALID = [
    pytest.param("corp-ldap", "nobody@ldap.example.test", id="ldap-unknown"),
    pytest.param("corp-ad", "zed@ad.example.test", id="active-directory-unknown"),
    pytest.param("corp-ad", "frank@ad.example.test", id="active-directory-disabled-account"),
    pytest.param("mailhost", "nobody@smtp.example.test", id="smtp-call-forward-refused"),
    pytest.param("tenant", "nobody@m365.example.test", id="m365-unknown"),
    pytest.param("tenant", "ivan@m365.example.test", id="m365-disabled-user"),
    pytest.param("mdaemon", "nobody@minger.example.test", id="minger-unknown"),
    pytest.param("mdaemon", "lou@minger.example.test", id="minger-not-accepting"),
]


@pytest.mark.parametrize("source, address", INVALID)
def test_invalid_recipient_is_refused_550_5_1_1(gateway, source, address):
    source_ip = "127.0.0.92"
    code, reply = rcpt(gateway, address, source_ip)
    assert code == 550 and reply.startswith("5.1.1"), (code, reply)

    event = rcpt_event(gateway, address, source_ip)
    # What Dynamic Screening counts as a failed RCPT.
    assert not event.accepted and event.reply_code == 550 and event.reason == "unknown recipient"
    assert event.verification.result == "invalid" and event.verification.source == source
    assert no_account(gateway, address)


DOWN = ["ldap-down", "ad-down", "smtp-down", "m365-down", "minger-down"]


@pytest.mark.parametrize("source", DOWN)
def test_source_that_is_down_gives_a_temporary_failure(gateway, source):
    source_ip = "127.0.0.93"
    address = f"someone@{source}.example.test"
    code, reply = rcpt(gateway, address, source_ip)
    assert code == 451 and reply.startswith("4.4.3"), (code, reply)

    event = rcpt_event(gateway, address, source_ip)
    assert not event.accepted and event.reason == "recipient verification unavailable"
    assert event.verification.result == "unavailable" and event.verification.source is None
    assert source in event.verification.detail
    assert no_account(gateway, address)


def test_default_source_serves_a_domain_without_sources(gateway):
    source_ip = "127.0.0.94"
    assert rcpt(gateway, "carol@fallback.example.test", source_ip)[0] == 250
    assert account(gateway, "carol@fallback.example.test").source == "directory-default"
    code, reply = rcpt(gateway, "nobody@fallback.example.test", source_ip)
    assert code == 550 and reply.startswith("5.1.1")


def test_domain_is_created_when_a_default_source_vouches_for_a_recipient(gateway):
    source_ip = "127.0.0.95"
    # newco.test is not a local domain: only the default source knows dave.
    msg = gateway.message(SENDER, ["dave@newco.test"], "mail for a new domain")
    gateway.send(msg, source_ip)  # 250 to RCPT and DATA, from a client that may not relay

    [created] = gateway.wait_records(lambda r: isinstance(r.event, ev.DomainCreated), [DOMAINS.name],
                                     keys={"newco.test"}, what="domain.created for newco.test")
    assert created.event.source == "directory-default"
    assert account(gateway, "dave@newco.test").source == "directory-default"
    event = rcpt_event(gateway, "dave@newco.test", source_ip)
    assert event.verification.domain_created and event.verification.account_created

    # From now on the domain is local: its unknown users are refused as such...
    code, reply = rcpt(gateway, "eve@newco.test", source_ip)
    assert code == 550 and reply.startswith("5.1.1"), (code, reply)
    # ...while a domain nobody vouches for is still a relay attempt.
    code, reply = rcpt(gateway, "someone@elsewhere.test", source_ip)
    assert code == 554 and "Relay access denied" in reply, (code, reply)


def test_cached_answer_is_not_asked_again_within_its_lifetime(gateway):
    source_ip = "127.0.0.96"
    address = "cache-probe@smtp.example.test"
    mailhost = gateway.verification.mailhost
    for _ in range(2):
        code, reply = rcpt(gateway, address, source_ip)
        assert code == 550, (code, reply)
    assert mailhost.rcpts[address] == 1  # the second answer came from the cache

    events = [r.event for r in gateway.wait_records(
        lambda r: isinstance(r.event, ev.SessionRcpt) and r.event.recipient == address and r.event.verification
        and r.event.verification.cached, [SESSIONS.name], keys={source_ip}, what="a cached answer")]
    assert events[-1].verification.source == "mailhost" and events[-1].verification.result == "invalid"


def test_a_burst_of_rcpts_shares_a_few_call_forward_connections(gateway):
    mailhost = gateway.verification.mailhost
    opened_before = mailhost.connections
    replies: list[int] = []

    def session(n: int) -> None:
        with gateway.smtp("127.0.0.97") as client:
            client.ehlo("burst.test")
            client.mail(SENDER)
            for i in range(n * 6, n * 6 + 6):
                replies.append(client.rcpt(f"burst{i}@smtp.example.test")[0])

    threads = [threading.Thread(target=session, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies == [250] * 30
    # max_connections is 2 in the test policy; idle ones are reused.
    assert mailhost.connections - opened_before <= 2
    assert mailhost.datas == 0  # a call-forward never sends DATA


def test_m365_token_is_cached_and_graph_throttling_is_honoured(gateway):
    stub = gateway.verification.m365
    code, reply = rcpt(gateway, "judy@m365.example.test", "127.0.0.98")
    assert code == 250, (code, reply)  # after a 429 with Retry-After: 1
    assert "judy@m365.example.test" in stub.throttled
    assert rcpt(gateway, "grace@m365.example.test", "127.0.0.98")[0] == 250
    assert stub.token_requests == 1  # one token, reused until it expires


# -- AUTH of an account a source created ------------------------------------------


def _submission_login(gateway, source_ip: str, login: str, password: str) -> int:
    context = ssl.create_default_context(cafile=str(gateway.settings.data_dir / "tls" / "selfsigned.crt"))
    with smtplib.SMTP(gateway.settings.smtp_host, gateway.settings.submission_port, timeout=60,
                      source_address=(source_ip, 0)) as client:
        client.ehlo("mua.test")
        client.starttls(context=context)
        client.ehlo("mua.test")
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {blob}")[0]


def test_auto_created_ldap_account_authenticates_by_bind(gateway):
    address = "alice@ldap.example.test"
    assert rcpt(gateway, address, "127.0.0.99")[0] == 250
    assert account(gateway, address).source == "corp-ldap"
    # Ingest's account view follows the topic: retry until it knows alice.
    deadline = time.monotonic() + 60
    n = 0
    while True:
        n += 1
        code = _submission_login(gateway, f"127.0.3.{n}", address, SECRETS["alice_password"])
        if code == 235:
            break
        assert time.monotonic() < deadline, f"AUTH never succeeded (last {code})"
        time.sleep(0.5)
    assert _submission_login(gateway, "127.0.3.200", address, "Wrong-Password-123") == 535


# -- the command line ---------------------------------------------------------------


def test_sources_test_prints_the_answer_and_how_long_it_took(gateway):
    result = gateway.cli("sources", "test", "corp-ad", "erin@ad.example.test")
    assert "erin@ad.example.test is valid in" in result.stdout and " ms" in result.stdout
    assert gateway.cli("sources", "test", "mdaemon", "nobody@minger.example.test", check=False).returncode == 1
    down = gateway.cli("sources", "test", "smtp-down", "x@smtp-down.example.test", check=False)
    assert down.returncode == 2 and "unavailable" in down.stdout


def test_accounts_list_shows_where_each_account_came_from(gateway):
    assert rcpt(gateway, "grace@m365.example.test", "127.0.0.98")[0] == 250
    account(gateway, "grace@m365.example.test")
    listing = gateway.cli("accounts", "list").stdout
    line = next(line for line in listing.splitlines() if line.startswith("grace@m365.example.test"))
    assert "tenant" in line


# -- last: nothing secret anywhere -------------------------------------------------


def test_no_secret_in_any_event_or_log(gateway):
    # Make sure every source has been used, AUTH included.
    _submission_login(gateway, "127.0.3.201", "erin@ad.example.test", SECRETS["erin_password"])
    events = "\n".join(json.dumps(r.event.model_dump(mode="json")) for r in gateway.records())
    logs = "\n".join(p.read_text(errors="replace") for p in (gateway.settings.data_dir / "logs").glob("*.log"))
    assert "corp-ldap" in events and "mdaemon" in events  # the sources were at work
    for name, secret in SECRETS.items():
        assert secret not in events, f"{name} is in an event"
        assert secret not in logs, f"{name} is in a component log"

"""The pure logic of the dialogue guards: relay control, IP Shielding, lists,
Location Screening and session limits, on a plain session object."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bulwark.policy import parse
from bulwark.policy_runtime import PolicyHolder
from ingest.guards.ip_shielding import IPShieldingGuard
from ingest.guards.limits import SessionLimitsGuard, size_reply
from ingest.guards.lists import ListsGuard
from ingest.guards.location import LocationGuard
from ingest.guards.relay import RelayGuard, check_recipient, raw_path_refusal

from .geodb import write_country_db

BASE = """hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.1.1.1, default: true, trusted_addresses: [192.0.2.10]}
"""


def session(ip="198.51.100.7", authenticated=False, **extra):
    return SimpleNamespace(client_ip=ip, authenticated=authenticated, id="s1", **extra)


def run(coro):
    return asyncio.run(coro)


class Accounts:
    def __init__(self, *known):
        self.known = set(known)

    def exists(self, address):
        return address.lower() in self.known


@pytest.mark.parametrize("address, reason", [
    ("user%elsewhere.test@example.com", "relay attempt: percent hack"),
    ("elsewhere.test!user@example.com", "relay attempt: bang path"),
    ('"user@elsewhere.test"@example.com', "relay attempt: quoted local part containing @"),
    ("user@[192.0.2.1]", "relay attempt: address literal"),
    ("victim@elsewhere.test", "relay denied"),
])
def test_relay_smuggling_forms_are_refused_with_their_reason(address, reason):
    refusal = check_recipient(parse(BASE), address, may_relay=False)
    assert refusal is not None and refusal.reason == reason and refusal.code >= 500


@pytest.mark.parametrize("arg, reason", [
    ("TO:<@relay.test,@other.test:user@example.com>", "relay attempt: source route"),
    ("TO:<a@elsewhere.test@example.com>", "relay attempt: several @"),
])
def test_forms_aiosmtpd_would_rewrite_are_judged_on_the_raw_command(arg, reason):
    refusal = raw_path_refusal(arg)
    assert refusal is not None and refusal.reason == reason and refusal.code == 553
    assert raw_path_refusal('TO:<"a@b"@example.com>') is None  # one unquoted @: judged later
    assert raw_path_refusal("TO:<user@example.com>") is None


def test_local_mail_without_auth_only_from_the_domain_mail_server():
    guard = RelayGuard(parse(BASE), Accounts("alice@example.com"))
    refusal = run(guard.on_mail(session(), "alice@example.com", []))
    assert refusal.reply.startswith("530 5.7.0") and "not a domain mail server" in refusal.reason
    assert run(guard.on_mail(session("192.0.2.10"), "alice@example.com", [])) is None
    assert run(guard.on_mail(session(authenticated=True), "alice@example.com", [])) is None
    # A claimed non-local sender decides nothing about relaying.
    assert run(guard.on_mail(session(), "someone@partner.test", [])) is None
    assert run(guard.on_mail(session(), "", [])) is None


def test_a_local_sender_must_exist_unless_an_exception_says_otherwise():
    guard = RelayGuard(parse(BASE), Accounts("alice@example.com"))
    refusal = run(guard.on_mail(session("192.0.2.10"), "ghost@example.com", []))
    assert refusal.reply.startswith("550 5.1.0") and refusal.reason == "local sender does not exist"
    lax = parse(BASE + "relay_control:\n  exceptions: {unknown_local_sender_from_domain_mail_servers: true}\n")
    assert run(RelayGuard(lax, Accounts()).on_mail(session("192.0.2.10"), "ghost@example.com", [])) is None


def test_ip_shielding_refuses_a_forged_local_sender_and_names_the_rule():
    policy = parse(BASE + "ip_shielding:\n  pairs:\n    - {domain: $LOCALDOMAIN$, ip: 192.0.2.0/24}\n"
                   "    - {domain: partner.test, ip: '2001:db8::/32'}\n")
    guard = IPShieldingGuard(policy)
    refusal = run(guard.on_mail(session("198.51.100.7"), "ceo@example.com", []))
    assert refusal.reply.startswith("550 5.7.1 IP Shielding") and "(rule #1)" in refusal.reply
    assert "198.51.100.7" in refusal.reason and "$LOCALDOMAIN$ 192.0.2.0/24" in refusal.reason
    assert run(guard.on_mail(session("192.0.2.99"), "ceo@example.com", [])) is None
    assert run(guard.on_mail(session("2001:db8::5"), "x@partner.test", [])) is None
    assert run(guard.on_mail(session("198.51.100.7"), "x@partner.test", [])) is not None
    assert run(guard.on_mail(session("198.51.100.7"), "x@unshielded.test", [])) is None
    # Authenticated sessions are exempt by default.
    assert run(guard.on_mail(session("198.51.100.7", authenticated=True), "ceo@example.com", [])) is None


def test_ip_shielding_checks_the_from_header_at_the_end_of_data():
    policy = parse(BASE + "ip_shielding:\n  pairs: [{domain: example.com, ip: 192.0.2.0/24}]\n")
    raw = b"From: \"The CEO\" <ceo@example.com>\r\nTo: x@partner.test\r\nSubject: hi\r\n\r\nbody\r\n"
    refusal = run(IPShieldingGuard(policy).on_data(session("198.51.100.7"), raw))
    assert refusal is not None and "From header" in refusal.reply
    off = parse(BASE + "ip_shielding:\n  check_from_header: false\n  pairs: [{domain: example.com, ip: 192.0.2.0/24}]\n")
    assert run(IPShieldingGuard(off).on_data(session("198.51.100.7"), raw)) is None


def test_a_shield_pair_may_let_a_device_send_without_auth():
    policy = parse(BASE + "ip_shielding:\n  pairs: [{domain: example.com, ip: 198.51.100.7, "
                   "send_without_auth: true, comment: printer}]\n")
    guard = RelayGuard(policy, Accounts("scanner@example.com"))
    assert run(guard.on_mail(session("198.51.100.7"), "scanner@example.com", [])) is None
    assert run(guard.on_mail(session("198.51.100.8"), "scanner@example.com", [])) is not None


def test_block_and_allow_lists():
    policy = parse(BASE + "block_list:\n  addresses: [203.0.113.0/24]\n  domains: [spam.test]\n"
                   "allow_list:\n  addresses: [203.0.113.9]\n")
    guard = ListsGuard(policy)
    blocked = session("203.0.113.5")
    refusal = run(guard.on_connect(blocked))
    assert refusal.code == 554 and refusal.reason == "block list: address 203.0.113.0/24"
    allowed = session("203.0.113.9")
    assert run(guard.on_connect(allowed)) is None  # the allow list skips the block list by default
    plain = session("198.51.100.1")
    run(guard.on_connect(plain))
    assert run(guard.on_mail(plain, "x@spam.test", [])).reason == "block list: domain spam.test"


def test_allow_listed_clients_skip_only_what_the_policy_says():
    policy = parse(BASE + "allow_list:\n  addresses: [198.51.100.7]\n"
                   "ip_shielding:\n  pairs: [{domain: example.com, ip: 192.0.2.0/24}]\n")
    s = session("198.51.100.7")
    run(ListsGuard(policy).on_connect(s))
    # ip_shielding is not in the default skips: still refused.
    assert run(IPShieldingGuard(policy).on_mail(s, "ceo@example.com", [])) is not None
    skipping = parse(BASE + "allow_list:\n  addresses: [198.51.100.7]\n  skips: [ip_shielding]\n"
                     "ip_shielding:\n  pairs: [{domain: example.com, ip: 192.0.2.0/24}]\n")
    assert run(IPShieldingGuard(skipping).on_mail(s, "ceo@example.com", [])) is None
    # Relay control is never skipped.
    assert run(RelayGuard(skipping, Accounts("ceo@example.com")).on_rcpt(s, "x@elsewhere.test", [])) is not None


def test_location_screening_refuses_connections_or_only_auth(tmp_path):
    db = write_country_db(tmp_path / "c.mmdb", {"198.51.100.0/28": "KP", "198.51.100.16/28": "RU"})
    policy = parse(BASE + f"location_screening:\n  enabled: true\n  database: {db}\n"
                   "  refuse_connections_from: [KP]\n  refuse_auth_from: [RU]\n")
    guard = LocationGuard(PolicyHolder.fixed(policy))
    refusal = run(guard.on_connect(session("198.51.100.3")))
    assert refusal.reply.startswith("554 5.7.1") and refusal.reason == "location screening: connection from KP"
    russian = session("198.51.100.20")
    assert run(guard.on_connect(russian)) is None
    assert run(guard.on_auth(russian, "alice@example.com")).reason == "location screening: AUTH from RU"
    assert run(guard.on_connect(session("192.0.2.1"))) is None  # not in the database: no country


def test_session_limits():
    policy = parse(BASE + "session_limits: {max_recipients_per_message: 2, max_commands_per_session: 3}\n")
    guard = SessionLimitsGuard(policy)
    s = session(envelope=SimpleNamespace(rcpt_tos=["a@example.com", "b@example.com"]))
    refusal = run(guard.on_rcpt(s, "c@example.com", []))
    assert refusal.reply.startswith("452 4.5.3") and "more than 2 recipients" in refusal.reason
    for _ in range(3):
        assert run(guard.on_command(s, "NOOP")) is None
    refusal = run(guard.on_command(s, "NOOP"))
    assert refusal.reply.startswith("421 4.7.0") and refusal.close
    reply, phase, reason = size_reply("552 Error: Too much mail data", 1000)
    assert reply.startswith("552 5.3.4") and phase == "DATA" and "1000 bytes" in reason
    assert size_reply("250 OK", 1000) is None

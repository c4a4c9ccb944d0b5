"""The pure logic of the dialogue guards: relay control, IP Shielding, lists,
Location Screening and session limits, on a plain session object."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bulwark.policy import parse
from bulwark.policy.runtime import PolicyHolder
from ingest.guards.ip_shielding import IPShieldingGuard
from ingest.guards.limits import SessionLimitsGuard, size_reply
from ingest.guards.lists import ListsGuard
from ingest.guards.location import LocationGuard
from ingest.guards.relay import RelayGuard, check_recipient, raw_path_refusal, take_sender_note
from ingest.guards.verification import VerificationGuard
from ingest.verification import Verifier
from ingest.verification.base import Finding, SourceUnavailable

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


class Publisher:
    def __init__(self):
        self.events = []

    async def publish(self, event):
        self.events.append(event)


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
    # example.com has no verification source: only a known account, or the
    # domain's own mail server, may send as one of its addresses.
    guard = RelayGuard(parse(BASE), Accounts("alice@example.com"))
    refusal = run(guard.on_mail(session(authenticated=True), "ghost@example.com", []))
    assert refusal.reply.startswith("550 5.1.0") and refusal.reason == "local sender does not exist"
    assert run(guard.on_mail(session(authenticated=True), "alice@example.com", [])) is None
    lax = parse(BASE + "relay_control:\n  exceptions: {unknown_local_sender_if_authenticated: true}\n")
    s = session(authenticated=True)
    assert run(RelayGuard(lax, Accounts()).on_mail(s, "ghost@example.com", [])) is None
    assert "unknown_local_sender_if_authenticated" in take_sender_note(s)
    off = parse(BASE + "relay_control: {local_sender_must_exist: false}\n")
    s = session(authenticated=True)
    assert run(RelayGuard(off, Accounts()).on_mail(s, "ghost@example.com", [])) is None
    assert take_sender_note(s) is None


# -- unknown local senders asked about, as RCPT asks (ingest.verification) --------

SOURCES = """verification_sources:
  - {name: corp-ldap, type: ldap, url: "ldap://ldap.example.com", base_dn: "dc=example,dc=com"}
  - {name: hr-ldap, type: ldap, url: "ldap://hr.example.com", base_dn: "dc=example,dc=com"}
user_verification:
  domains:
    example.com: [corp-ldap, hr-ldap]
"""


class Scripted:
    """A source client answering from a script; counts the questions."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    async def verify(self, address):
        self.asked.append(address)
        result = self.answers.get(address.lower(), "invalid")
        if result == "unavailable":
            raise SourceUnavailable("cannot connect")
        return Finding(result, f"scripted {result}")

    async def close(self):
        pass


def verifier_for(policy, **clients):
    verifier = Verifier()
    for source in policy.verification_sources:
        verifier._clients[source.name] = (source.model_dump_json(), clients[source.name.replace("-", "_")])
    return verifier


def test_an_unknown_local_sender_is_asked_about_like_a_recipient():
    policy = parse(BASE + SOURCES)
    corp = Scripted({"postmaster@example.com": "valid", "down@example.com": "unavailable"})
    hr = Scripted({"hired@example.com": "valid"})
    guard = RelayGuard(policy, Accounts("alice@example.com"), verifier_for(policy, corp_ldap=corp, hr_ldap=hr))
    server = "192.0.2.10"

    # Known account: no source is asked.
    assert run(guard.on_mail(session(server), "alice@example.com", [])) is None
    assert corp.asked == []

    s = session(server)
    assert run(guard.on_mail(s, "postmaster@example.com", [])) is None
    assert take_sender_note(s) == "local sender verified by corp-ldap"
    # The second source is asked when the first says no.
    assert run(guard.on_mail(session(server), "hired@example.com", [])) is None

    refusal = run(guard.on_mail(session(server), "ghost@example.com", []))
    assert refusal.reply == "550 5.1.0 Sender address rejected: not a known local address"
    assert refusal.reason == "local sender does not exist (corp-ldap)"

    # One source down, the other says no: the sender may live in the first.
    refusal = run(guard.on_mail(session(server), "down@example.com", []))
    assert refusal.code == 451 and "4.4.3" in refusal.reply and "<down@example.com>" in refusal.reply
    assert refusal.reason == "sender verification unavailable (corp-ldap: cannot connect)"

    # Authenticated sessions and shielded devices are asked about the same way.
    assert run(guard.on_mail(session(authenticated=True), "postmaster@example.com", [])) is None


def test_sender_answers_share_the_recipient_cache():
    policy = parse(BASE + SOURCES)
    corp = Scripted({"postmaster@example.com": "valid"})
    verifier = verifier_for(policy, corp_ldap=corp, hr_ldap=Scripted({}))
    rcpt = VerificationGuard(policy, Accounts(), Publisher(), verifier)
    relay = RelayGuard(policy, Accounts(), verifier)

    assert run(rcpt.on_rcpt(session("198.51.100.7"), "postmaster@example.com", [])) is None
    s = session("192.0.2.10")
    assert run(relay.on_mail(s, "POSTMASTER@example.com", [])) is None
    assert take_sender_note(s) == "local sender verified by corp-ldap, cached"
    run(relay.on_mail(session("192.0.2.10"), "nobody@example.com", []))
    run(relay.on_mail(session("192.0.2.10"), "nobody@example.com", []))
    assert corp.asked == ["postmaster@example.com", "nobody@example.com"]


def test_a_domain_without_sources_accepts_its_senders_from_its_own_mail_servers():
    policy = parse("""hostname: gw.example.com
local_domains: [example.com, example.org]
mail_servers:
  - {name: mx, host: 10.1.1.1, default: true, trusted_addresses: [192.0.2.10]}
  - {name: org, host: 10.1.1.2, domains: [example.org], trusted_addresses: [192.0.2.20]}
""" + SOURCES)
    corp = Scripted({})
    guard = RelayGuard(policy, Accounts(), verifier_for(policy, corp_ldap=corp, hr_ldap=Scripted({})))

    s = session("192.0.2.20")
    assert run(guard.on_mail(s, "postmaster@example.org", [])) is None
    assert "example.org has no verification source" in take_sender_note(s)
    # Another domain's server may not send as example.org at all; an
    # authenticated user needs a known account there.
    assert run(guard.on_mail(session("192.0.2.10"), "postmaster@example.org", [])).code == 530
    refusal = run(guard.on_mail(session(authenticated=True), "postmaster@example.org", []))
    assert refusal.reason == "local sender does not exist"
    assert corp.asked == []


def test_without_a_verifier_an_unknown_sender_cannot_be_verified():
    guard = RelayGuard(parse(BASE + SOURCES), Accounts())
    refusal = run(guard.on_mail(session("192.0.2.10"), "postmaster@example.com", []))
    assert refusal.code == 451 and refusal.reason == "sender verification unavailable (no verifier in this server)"


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


def test_rcpts_over_the_recipient_limit_are_not_commands_up_to_the_overshoot_limit():
    # A message to 1,000 recipients, pipelined: 100 accepted, the rest 452,
    # and the client still reaches DATA (RFC 5321 4.5.3.1.10).
    policy = parse(BASE + "session_limits: {max_recipients_per_message: 2, max_commands_per_session: 4, "
                          "recipient_overshoot_limit: 3}\n")
    guard = SessionLimitsGuard(policy)
    s = session(envelope=SimpleNamespace(rcpt_tos=[]))
    for command in ("EHLO", "MAIL", "RCPT", "RCPT"):
        assert run(guard.on_command(s, command)) is None
        if command == "RCPT":
            s.envelope.rcpt_tos.append("x@example.com")
    for _ in range(3):  # overshoot: 452 each, not counted
        assert run(guard.on_command(s, "RCPT")) is None
        assert run(guard.on_rcpt(s, "y@example.com", [])).code == 452
    assert s.commands == 4
    # Past the overshoot limit they count, and the commands limit applies.
    refusal = run(guard.on_command(s, "RCPT"))
    assert refusal is not None and refusal.reply.startswith("421 4.7.0")


@pytest.mark.parametrize("raw", [
    b"From: a@shielded.test\r\nSubject: hi\r\n\r\nFrom: evil@other.test\r\n\r\nbody\r\n",
    b"From: a@shielded.test\nSubject: bare LF\n\nFrom: evil@other.test\r\n\r\nbody\n",
    b"From: a@shielded.test\r\nSubject: no body at all",
    b"Subject: folded\r\n  over two lines\r\nFrom: a@shielded.test\r\n\r\n" + b"x" * 100_000,
])
def test_guards_read_the_header_fields_as_the_whole_message_parser_does(raw):
    # parse_headers hands the parser only the header section (bulwark/headers.py).
    from email.parser import BytesHeaderParser

    from bulwark.headers import parse_headers

    assert parse_headers(raw).items() == BytesHeaderParser().parsebytes(raw).items()

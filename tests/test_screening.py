"""Dynamic Screening and Account Hijack Detection logic, in-process (no broker).

The agents run under Faust's test_context with an in-memory store; what they
publish is captured instead of sent.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import faust
import pytest

from bulwark.policy import Policy
from bulwark.policy.runtime import PolicyHolder
from schemas import codec
from schemas import events as ev
from schemas.topics import ACCOUNT_STATE, BANS, HIJACK_LIMITS, RECEIVED, SESSIONS
from streams import eventio, hijack, once, screening

T0 = datetime(2026, 11, 2, 9, 0, 7, tzinfo=timezone.utc)
SERVER_IP = "192.0.2.25"


def policy(**sections) -> Policy:
    return Policy.model_validate({
        "hostname": "gw.example.test",
        "local_domains": ["example.test"],
        "mail_servers": [{"name": "mx", "host": "127.0.0.1", "trusted_addresses": [f"{SERVER_IP}/32"],
                          "default": True}],
        **sections,
    })


class Captured(list):
    async def __call__(self, topic, event, key=None, headers=()):
        self.append(event)


@pytest.fixture
def published(monkeypatch):
    captured = Captured()
    monkeypatch.setattr(eventio, "send_event", captured)
    return captured


def make_app(p: Policy):
    app = faust.App(f"test-{id(p)}", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False,
                    topic_disable_leader=True)
    holder = PolicyHolder.fixed(p)

    def raw(spec):
        return app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=spec.partitions)

    return app, holder, raw


async def feed(agent, events, key_of=lambda e: e.client_ip, extra_headers=lambda e: {}):
    for event in events:
        value, headers = codec.encode(event)
        await agent.put(value, key=key_of(event).encode(), timestamp=event.occurred_at.timestamp(),
                        headers={**dict(headers), **extra_headers(event)})


def connects(ip: str, n: int, start=T0, every=timedelta(seconds=5)):
    return [ev.SessionConnected(occurred_at=start + i * every, session_id=f"s{i}", client_ip=ip,
                                client_port=40000 + i, listener="inbound", server_port=25) for i in range(n)]


def failed_rcpts(ip: str, n: int, start=T0):
    return [ev.SessionRcpt(occurred_at=start + timedelta(seconds=i), session_id="s", client_ip=ip,
                           recipient=f"nobody{i}@example.test", accepted=False, reply_code=550,
                           reason="unknown user") for i in range(n)]


def failed_console_logins(ip: str, n: int, start=T0):
    return [ev.ConsoleLoginFailed(occurred_at=start + timedelta(seconds=i), client_ip=ip, login="admin")
            for i in range(n)]


def failed_auths(ip: str, n: int, start=T0):
    return [ev.SessionAuth(occurred_at=start + timedelta(seconds=i), session_id="s", client_ip=ip,
                           mechanism="PLAIN", username="alice@example.test", outcome="failure",
                           reason="invalid credentials") for i in range(n)]


async def run_screening(p: Policy, events, redelivered_from: int | None = None):
    """Feed ``events``; then, as after a crash, deliver them again from that offset on."""
    app, holder, raw = make_app(p)
    parts = screening.install(app, holder, raw(SESSIONS), raw(BANS))
    async with parts["agent"].test_context() as agent:
        await feed(agent, events)
        if redelivered_from is not None:
            agent.sent_offset = redelivered_from
            await feed(agent, events[redelivered_from:])
    return parts


# -- pure rules ---------------------------------------------------------------


def test_defaults_follow_the_guide():
    rules = Policy(hostname="gw", local_domains=["example.test"]).screening
    assert rules.enabled and rules.close_session_after_ban
    assert (rules.failed_rcpt_limit, rules.connection_limit, rules.window_minutes) == (10, 10, 5)
    assert (rules.failed_auth_limit, rules.ban_minutes) == (3, 10)
    # "more than 10 connections": the 11th bans; "3 failed AUTH": the 3rd does.
    assert screening.limits(rules)[screening.CONNECTIONS] == 11
    assert screening.limits(rules)[screening.FAILED_AUTH] == 3
    # The guide's failed authentication attempts, for the web console's logins too.
    assert rules.failed_console_login_limit == 3
    assert screening.limits(rules)[screening.FAILED_CONSOLE_LOGIN] == 3


def test_what_counts():
    rules = policy()
    [rcpt] = failed_rcpts("198.51.100.1", 1)
    assert screening.counted_as(rcpt, rules) == screening.FAILED_RCPT
    assert screening.counted_as(rcpt.model_copy(update={"reply_code": 451}), rules) is None
    [auth] = failed_auths("198.51.100.1", 1)
    assert screening.counted_as(auth, rules) == screening.FAILED_AUTH
    assert screening.counted_as(auth.model_copy(update={"reason": "TLS required"}), rules) is None
    # Ingest ends a session at session_limits.max_duration_seconds (900 by default).
    long = ev.SessionDisconnected(client_ip="198.51.100.1", duration_seconds=900.0, messages_accepted=0)
    assert screening.counted_as(long, rules) == screening.LONG_SESSIONS
    assert screening.counted_as(long.model_copy(update={"duration_seconds": 60}), rules) is None
    # The agent parses only the types that can count (and the bans): each counted example is one of them.
    [connect] = connects("198.51.100.1", 1)
    [login] = failed_console_logins("198.51.100.1", 1)
    rset = ev.SessionRset(client_ip="198.51.100.1")
    for counted in (rcpt, auth, long, connect, login, rset):
        assert screening.counted_as(counted, rules) is not None
        assert counted.TYPE in screening.READ_TYPES
    assert ev.SessionEhlo.TYPE not in screening.READ_TYPES and ev.SessionData.TYPE not in screening.READ_TYPES


def test_domain_mail_servers_are_exempt():
    assert screening.exempt(policy(), SERVER_IP)
    assert not screening.exempt(policy(), "198.51.100.1")


# -- the agent ------------------------------------------------------------------


async def test_more_than_n_connections_in_the_window_bans_once(published):
    ip = "198.51.100.7"
    await run_screening(policy(), connects(ip, 14))
    [ban] = published
    assert ban.client_ip == ip
    assert ban.counters["connections"] == 11
    assert ban.occurred_at == T0 + 10 * timedelta(seconds=5)  # the 11th connection
    assert ban.expires_at == ban.occurred_at + timedelta(minutes=10)
    assert ban.window_start <= T0 and ban.window_end - ban.window_start == timedelta(minutes=5)
    assert "11 connections in 5 minutes" in ban.reason


async def test_each_counted_event_writes_one_table_value(published, monkeypatch):
    """The table's changelog carries one record per counted event, not one per window."""
    app, holder, raw = make_app(policy())
    parts = screening.install(app, holder, raw(SESSIONS), raw(BANS))
    table = parts["counters"].table
    writes = []
    original = type(table).__setitem__
    monkeypatch.setattr(type(table), "__setitem__", lambda self, k, v: (writes.append(k), original(self, k, v)))
    async with parts["agent"].test_context() as agent:
        await feed(agent, connects("198.51.100.9", 4, every=timedelta(seconds=70)))
        counts = parts["counters"].counts("198.51.100.9", (T0 + timedelta(seconds=3 * 70)).timestamp())
    assert len(writes) == 4 and counts["connections"] == 4
    # Four events one step (a minute) or more apart: four steps, each holding one.
    assert len({step for _, step in writes}) == 4


async def test_connections_spread_beyond_the_window_do_not_ban(published):
    # 20 connections, one every 40 seconds: never more than 10 in 5 minutes.
    await run_screening(policy(), connects("198.51.100.8", 20, every=timedelta(seconds=40)))
    assert published == []


async def test_failed_rcpts_and_auth_ban_at_their_limits(published):
    await run_screening(policy(), failed_rcpts("198.51.100.9", 10) + failed_auths("198.51.100.10", 3))
    assert [(b.client_ip, b.counters["failed_rcpt"], b.counters["failed_auth"]) for b in published] == [
        ("198.51.100.9", 10, 0), ("198.51.100.10", 0, 3)]


async def test_failed_console_logins_ban_at_their_limit(published):
    # Two from one address do not; the third from another does, as the
    # console's refused logins arrive on console.logins.
    await run_screening(policy(), failed_console_logins("198.51.100.20", 2) + failed_console_logins("198.51.100.21", 3))
    [ban] = published
    assert ban.client_ip == "198.51.100.21" and ban.counters["failed_console_login"] == 3
    assert ban.session_id is None and "3 failed console logins in 5 minutes" in ban.reason


async def test_failed_console_logins_follow_their_policy_limit_and_the_allow_list(published):
    await run_screening(policy(screening={"failed_console_login_limit": 5}), failed_console_logins("198.51.100.22", 4))
    await run_screening(policy(allow_list={"addresses": ["198.51.100.23/32"]}),
                        failed_console_logins("198.51.100.23", 6))
    assert published == []
    await run_screening(policy(screening={"failed_console_login_limit": 5}), failed_console_logins("198.51.100.22", 5))
    assert [b.client_ip for b in published] == ["198.51.100.22"]


async def test_domain_mail_server_and_disabled_screening_never_ban(published):
    await run_screening(policy(), connects(SERVER_IP, 30))
    await run_screening(policy(screening={"enabled": False}), connects("198.51.100.11", 30))
    assert published == []


async def test_replay_gives_the_same_bans(published):
    events = connects("198.51.100.12", 12) + failed_auths("198.51.100.13", 7)
    await run_screening(policy(), events)
    first = list(published)
    published.clear()
    await run_screening(policy(), events)  # a fresh table, the same topic
    assert published == first  # the same bans, down to their event ids
    assert len(first) == 3  # 12 connections: one ban; 7 failed AUTH: 3 + 3 (the 7th is left over)


async def test_records_delivered_again_are_counted_once(published):
    ip = "198.51.100.15"
    # Two failed AUTHs, then both again (a crash before their offsets were
    # committed): still two, under the limit of three.
    await run_screening(policy(), failed_auths(ip, 2), redelivered_from=0)
    assert published == []
    # Five, of which the last three come again: one ban at the third, one
    # count left over; the redelivered ban is not issued again.
    await run_screening(policy(), failed_auths(ip, 5), redelivered_from=2)
    [ban] = published
    assert ban.counters["failed_auth"] == 3


async def test_unban_clears_the_counters(published):
    ip = "198.51.100.14"
    later = T0 + timedelta(seconds=20)
    lifted = ev.BanLifted(occurred_at=later, client_ip=ip, by="admin")
    await run_screening(policy(), failed_auths(ip, 2) + [lifted] + failed_auths(ip, 2, start=later))
    assert published == []  # 2 before the unban, 2 after: never 3 together


# -- Account Hijack Detection ------------------------------------------------------


def received(account: str | None, n: int, client_ip="198.51.100.30", mail_from="someone@example.test",
             start=T0, every=timedelta(seconds=10)):
    return [ev.MessageReceived(
        occurred_at=start + i * every, session_id="s", message_id=f"m{i}",
        envelope=ev.Envelope(mail_from=mail_from, rcpt_to=["x@partner.test"], sha256="0" * 64, size=10,
                             client_ip=client_ip, authenticated_user=account, received_at=start + i * every),
        direction="outbound") for i in range(n)]


def test_account_of():
    p = policy()
    [auth] = received("Alice@Example.test", 1)
    assert hijack.account_of(auth, p) == "alice@example.test"
    [server] = received(None, 1, client_ip=SERVER_IP, mail_from="Bob@example.test")
    assert hijack.account_of(server, p) == "bob@example.test"
    assert hijack.account_of(server, policy(hijack={"include_domain_mail_servers": False})) is None
    [anonymous] = received(None, 1)
    assert hijack.account_of(anonymous, p) is None


async def run_hijack(p: Policy, messages, state_changes=(), origin=lambda e: {}):
    app, holder, raw = make_app(p)
    parts = hijack.install(app, holder, raw(RECEIVED), raw(ACCOUNT_STATE), raw(HIJACK_LIMITS))
    detection = next(a for name, a in app.agents.items() if name.endswith("account_hijack_detection"))
    events = sorted([*messages, *state_changes], key=lambda e: e.occurred_at)
    async with detection.test_context() as agent:
        await feed(agent, events, key_of=lambda e: (e.address if isinstance(e, ev.AccountStateChanged)
                                                    else e.envelope.authenticated_user or e.envelope.mail_from),
                   extra_headers=origin)
    return parts


async def test_a_message_forwarded_twice_is_counted_once(published):
    # The forwarding agent crashed and forwarded m1 and m2 again: the
    # repartition topic holds them twice, at new offsets, with their origin.
    first = received("alice@example.test", 3)
    again = [m.model_copy(update={"occurred_at": m.occurred_at + timedelta(seconds=1)}) for m in first[1:]]
    origin = {m.message_id: n for n, m in enumerate(first)}

    def header(message):
        return dict([once.Source(f"{RECEIVED.name}/0", origin[message.message_id]).header()])

    await run_hijack(policy(hijack={"message_limit": 4, "window_minutes": 10}), first + again, origin=header)
    assert published == []  # three messages, not five


async def test_account_over_its_limit_reaches_it_once_per_window(published):
    await run_hijack(policy(hijack={"message_limit": 5, "window_minutes": 10}), received("alice@example.test", 8))
    [fact] = published
    assert isinstance(fact, ev.AccountLimitReached)
    assert (fact.address, fact.messages, fact.limit) == ("alice@example.test", 5, 5)
    assert fact.client_ips == ["198.51.100.30"]
    assert fact.until == fact.window_end


async def test_disabling_publishes_the_account_state_with_the_evidence(published):
    p = policy(hijack={"message_limit": 3, "window_minutes": 10, "disable_account": True})
    await run_hijack(p, received("alice@example.test", 6))
    [fact] = published
    assert isinstance(fact, ev.AccountStateChanged)
    assert not fact.enabled and fact.by == "account-hijack-detection"
    assert fact.details["messages"] == 3 and fact.details["client_ips"] == ["198.51.100.30"]


async def test_re_enabling_starts_the_count_again(published):
    p = policy(hijack={"message_limit": 3, "window_minutes": 10, "disable_account": True})
    enabled_at = T0 + timedelta(seconds=25)
    enable = ev.AccountStateChanged(occurred_at=enabled_at, address="alice@example.test", enabled=True,
                                    reason="checked", by="admin")
    await run_hijack(p, received("alice@example.test", 3) + received("alice@example.test", 2, start=enabled_at + timedelta(seconds=1)),
                     [enable])
    assert len(published) == 1  # disabled at the 3rd; after enabling only 2 more


def test_a_malformed_origin_header_falls_back_to_the_records_own_position():
    from types import SimpleNamespace

    message = SimpleNamespace(topic=SESSIONS.name, partition=2, offset=41)
    bad = SimpleNamespace(headers={once.SOURCE_HEADER: b"not-an-origin"}, message=message)
    good = SimpleNamespace(headers={once.SOURCE_HEADER: b"mail.received/3/7"}, message=message)
    assert once.source_of(bad) == once.Source(f"{SESSIONS.name}/2", 41)
    assert once.source_of(good) == once.Source("mail.received/3", 7)

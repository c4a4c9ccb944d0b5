"""``bulwark replay sessions`` without a broker: the replay issues what the live agents issue, and explains a candidate.

The agents run under Faust's test_context (tests/test_screening.py's
helpers); the replay runs over the same records, as ``Input``s at the
positions the agents saw them, so even the event ids must agree.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from bulwark import replay_sessions as rs
from schemas import events as ev
from streams import hijack

from tests import test_screening
from tests.test_screening import (T0, connects, failed_auths, failed_console_logins, failed_rcpts, policy, received,
                                  run_hijack, run_screening)

#: What the agents publish, captured (tests/test_screening.py's fixture).
published = test_screening.published

INTERNAL = "<internal>"  # the topic name test_context gives every record it feeds


def inputs(events) -> list[rs.Input]:
    return [rs.Input(e.timestamp_ms, INTERNAL, 0, n, e) for n, e in enumerate(events)]


def replayed(events, p, selection=rs.Selection.of()) -> list[rs.Fact]:
    facts, _ = rs.run(inputs(events), selection, lambda _ms: p, p.screening.window_minutes, p.hijack.window_minutes)
    return facts


async def test_the_replay_issues_the_screening_agents_bans_with_their_ids(published):
    later = T0 + timedelta(seconds=20)
    events = sorted(connects("198.51.100.12", 24) + failed_auths("198.51.100.13", 7)
                    + failed_auths("198.51.100.14", 2) + [ev.BanLifted(occurred_at=later, client_ip="198.51.100.14",
                                                                        by="admin")]
                    + failed_auths("198.51.100.14", 2, start=later) + failed_console_logins("198.51.100.15", 3)
                    + failed_rcpts("198.51.100.16", 9), key=lambda e: e.occurred_at)
    await run_screening(policy(), events)
    live = [(b.event_id, b.client_ip, b.occurred_at.isoformat(), b.expires_at.isoformat()) for b in published]
    # 24 connections: two bans; 7 AUTH failures: two; the console: one; the unban and 9 RCPTs (of 10): none
    assert len(live) == 5
    assert [(f.event_id, f.subject, f.at, f.until) for f in replayed(events, policy())] == live


async def test_the_replay_issues_the_hijack_agents_limits_and_disables(published):
    limits = policy(hijack={"message_limit": 5, "window_minutes": 10})
    messages = received("alice@example.test", 8) + received("bob@example.test", 3)
    await run_hijack(limits, messages)
    assert [(f.kind, f.event_id, f.subject) for f in replayed(sorted(messages, key=lambda e: e.occurred_at), limits)] \
        == [("limit", e.event_id, e.address) for e in published] != []

    published.clear()
    disables = policy(hijack={"message_limit": 3, "window_minutes": 10, "disable_account": True})
    enabled_at = T0 + timedelta(seconds=25)
    enable = ev.AccountStateChanged(occurred_at=enabled_at, address="alice@example.test", enabled=True,
                                    reason="checked", by="admin")
    messages = received("alice@example.test", 3) + received("alice@example.test", 4,
                                                            start=enabled_at + timedelta(seconds=1))
    await run_hijack(disables, messages, [enable])
    events = sorted([*messages, enable], key=lambda e: e.occurred_at)
    assert [(f.kind, f.event_id) for f in replayed(events, disables)] == [("disable", e.event_id) for e in published]
    assert len(published) == 2  # disabled, enabled by the administrator, disabled again


def test_the_agents_own_disables_on_accounts_state_are_not_inputs():
    p = policy(hijack={"message_limit": 3, "window_minutes": 10, "disable_account": True})
    messages = received("alice@example.test", 3)
    [fact] = replayed(messages, p)
    # What the live agent published comes back on accounts.state: replaying it
    # as an input would mark the account disabled before the replay decides.
    recorded = ev.AccountStateChanged(occurred_at=T0, address="alice@example.test", enabled=False, reason="x",
                                      by=hijack.HIJACK_DETECTION)
    facts, _ = rs.run([rs.Input(recorded.timestamp_ms, "accounts.state", 0, 0, recorded), *inputs(messages)],
                      rs.Selection.of(), lambda _ms: p, 5, 10)
    assert [f.event_id for f in facts] == [fact.event_id]


def test_a_candidate_with_a_higher_limit_bans_no_one_and_says_why():
    current, candidate = policy(), policy(screening={"failed_rcpt_limit": 40})
    events = failed_rcpts("198.51.100.20", 12)
    then, now = replayed(events, current), replayed(events, candidate)
    assert [f.kind for f in then] == ["ban"] and now == []
    [difference] = rs.differences(then, now, candidate, lambda v: current, current)
    assert difference.subject == "198.51.100.20" and difference.feature == "screening"
    assert difference.causes == [f"screening.failed_rcpt_limit: 10 under {current.version}, 40 in the candidate"]
    assert rs.Difference.summary(difference.candidate) == "none"
    assert "10 failed RCPTs in 5 minutes" in rs.Difference.summary(difference.recorded)


def test_an_allow_listed_address_in_the_candidate_is_named_as_the_cause():
    current = policy()
    candidate = policy(allow_list={"addresses": ["198.51.100.21/32"]})
    events = failed_rcpts("198.51.100.21", 10)
    [difference] = rs.differences(replayed(events, current), replayed(events, candidate), candidate,
                                  lambda v: current, current)
    assert any("exempt in the candidate" in c for c in difference.causes)


def test_only_facts_in_the_selected_time_are_reported_but_earlier_events_count():
    events = failed_rcpts("198.51.100.22", 10)
    # The ban comes with the 10th failure; counting needs the nine before it.
    selection = rs.Selection.of(since=events[-1].occurred_at)
    assert [f.kind for f in replayed(events, policy(), selection)] == ["ban"]
    assert replayed(events, policy(), rs.Selection.of(since=events[-1].occurred_at + timedelta(seconds=1))) == []


def test_the_policy_in_force_at_each_event_decides():
    strict, lenient = policy(screening={"failed_rcpt_limit": 5}), policy(screening={"failed_rcpt_limit": 50})
    events = failed_rcpts("198.51.100.23", 8) + failed_rcpts("198.51.100.24", 8, start=T0 + timedelta(minutes=1))
    switch = (T0 + timedelta(seconds=30)).timestamp() * 1000
    facts, counted = rs.run(inputs(sorted(events, key=lambda e: e.occurred_at)), rs.Selection.of(),
                            lambda ms: strict if ms < switch else lenient, 5, 60)
    assert [(f.subject, f.policy_version) for f in facts] == [("198.51.100.23", strict.version)]
    assert counted == 16


def test_a_selection_names_its_feature():
    assert rs.Selection.of(client_ips=["192.0.2.1"]).features == {rs.SCREENING}
    assert rs.Selection.of(accounts=["Alice@Example.test"]).features == {rs.HIJACK}
    assert rs.Selection.of(accounts=["Alice@Example.test"]).accounts == {"alice@example.test"}
    assert rs.Selection.of().features == rs.Selection.of(client_ips=["192.0.2.1"], accounts=["a@b"]).features \
        == {rs.SCREENING, rs.HIJACK}


def test_records_decode_alike_through_the_fast_path_and_the_codec():
    from schemas import codec

    [rcpt] = failed_rcpts("198.51.100.30", 1)
    value, headers = codec.encode(rcpt)
    assert rs._decode(value, headers, rcpt.TYPE.encode()) == codec.decode(value, headers) == rcpt
    # A body that is not what its headers say is refused, as the codec refuses it.
    [connect] = connects("198.51.100.30", 1)
    other, _ = codec.encode(connect)
    with pytest.raises(ValueError):
        rs._decode(other, headers, rcpt.TYPE.encode())
    with pytest.raises(ValueError):
        codec.decode(other, headers)

"""Account Hijack Detection: accounts may send no more than N messages in M minutes.

Two agents, because the count is per account and messages arrive keyed by
message id:

1. ``hijack_messages`` consumes ``mail.received`` (only messages answered
   250) and forwards each one that belongs to an account to an internal topic
   keyed by that account: the AUTH login, or, when the policy includes them,
   the MAIL FROM of a domain mail server's unauthenticated session. This is
   a repartition (what Faust's ``group_by`` does), spelled out so the key is
   explicit and the record timestamp stays the event's time. The topic is
   Faust's own, like its changelogs, so it is not declared in
   ``schemas/topics.py``: nothing outside this app reads it.

2. ``account_hijack_detection`` consumes that topic together with
   ``accounts.state`` (both keyed by account, same partition count, so one
   worker owns an account's counter and its state) and counts messages in an
   event-time hopping window. When an account reaches its limit it publishes
   a fact, and ingest enforces it:

   - by default an ``AccountLimitReached`` on the compacted ``hijack.limits``
     topic: ingest answers the account's next messages 452 (temporary) until
     the window has moved on;
   - with "disable account when limit is reached", an ``AccountStateChanged``
     (disabled) on ``accounts.state``: ingest refuses the account's AUTH and
     mail with 5xx and drops its sessions, and the delivery sink notifies the
     administrator.

   An ``AccountStateChanged`` that enables the account (``bulwark accounts
   enable``) clears its counter, so it is not disabled again by the next
   message.

Why a published fact rather than a count in ingest: the window lives here and
is the one authority over every ingest node; ingest only enforces facts
(counters count, deciders decide). The cost is the latency of one record
through Kafka (well under a second), in which a fast sender may get one more
message accepted; the benchmark measures it.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bulwark import metrics
from schemas import events as ev
from streams.once import Source, cleared, count_once, event_id, once
from streams.screening import STEPS_PER_WINDOW, _dt, window_bounds

if TYPE_CHECKING:
    import faust

    from bulwark.policy import Policy

log = logging.getLogger(__name__)

HIJACK_DETECTION = "account-hijack-detection"
#: Client addresses kept per window: enough to show an administrator where
#: a hijacked account is used from, bounded so a botnet cannot bloat a row.
MAX_CLIENT_IPS = 50


def account_key(address: str) -> str:
    # As ingest.accounts keys accounts.state: the address, lower-cased.
    return address.strip().strip("<>").lower()


def account_of(event: ev.MessageReceived, policy: "Policy") -> str | None:
    """The account a received message counts against, if any."""
    envelope = event.envelope
    if envelope.authenticated_user:
        return account_key(envelope.authenticated_user)
    if (policy.hijack.include_domain_mail_servers and envelope.mail_from
            and policy.is_domain_mail_server(envelope.client_ip)):
        return account_key(envelope.mail_from)
    return None


def add_message(old: dict | None, increment: dict) -> dict:
    """Window operation: one more message, and where it came from."""
    old = old or {}
    ips = list(old.get("client_ips", []))
    for ip in increment.get("client_ips", []):
        if ip not in ips and len(ips) < MAX_CLIENT_IPS:
            ips.append(ip)
    return {"messages": old.get("messages", 0) + increment.get("messages", 0), "client_ips": ips}


def decide(account: str, counts: dict, window: tuple[float, float], event: ev.MessageReceived,
           policy: "Policy", event_id: str | None = None) -> ev.Event | None:
    """The fact an account's count calls for, if it reached the limit. Pure."""
    fixed = {"event_id": event_id} if event_id else {}
    rules = policy.hijack
    messages = counts.get("messages", 0)
    if messages < rules.message_limit:
        return None
    details = {
        "messages": messages,
        "limit": rules.message_limit,
        "window_minutes": rules.window_minutes,
        "window_start": _dt(window[0]).isoformat(),
        "window_end": _dt(window[1]).isoformat(),
        "client_ips": list(counts.get("client_ips", [])),
    }
    if rules.disable_account:
        return ev.AccountStateChanged(
            **fixed,
            occurred_at=event.occurred_at,
            session_id=event.session_id,
            message_id=event.message_id,
            address=account,
            enabled=False,
            reason=(f"Account Hijack Detection: {messages} messages in {rules.window_minutes} minutes "
                    f"(no more than {rules.message_limit} allowed)"),
            by=HIJACK_DETECTION,
            details=details,
        )
    return ev.AccountLimitReached(
        **fixed,
        occurred_at=event.occurred_at,
        session_id=event.session_id,
        message_id=event.message_id,
        address=account,
        messages=messages,
        limit=rules.message_limit,
        window_start=_dt(window[0]),
        window_end=_dt(window[1]),
        client_ips=list(counts.get("client_ips", [])),
        until=_dt(window[1]),
    )


class HijackDetector:
    """What Account Hijack Detection does with each record: count an account's messages, judge, publish once.

    The live agent (``install``) and ``bulwark replay sessions``
    (``bulwark/replay_sessions.py``) both run this: the agent over its Faust
    tables, the replay over mappings in memory, so a replay reaches the
    limits and disables the agent would have, with the same ids. ``windows``
    is an account's hopping windows (what ``table[account]`` is in Faust:
    ``apply`` and ``delta`` at the record's time), ``window`` the window
    definition, ``at`` the record's timestamp in seconds.
    """

    def __init__(self, states: MutableMapping, reached: MutableMapping, size: float, step: float):
        #: Latest AccountStateChanged per account, as JSON.
        self.states = states
        #: Latest AccountLimitReached per account, as JSON: published once per window.
        self.reached = reached
        self.size, self.step = size, step

    def state_changed(self, event: ev.AccountStateChanged, windows, source: Source) -> None:
        """Follow ``accounts.state``; ``windows`` are the account's."""
        key = account_key(event.address)
        self.states[key] = event.model_dump(mode="json")
        if event.enabled:
            # Re-enabled: the messages before it no longer count.
            windows.apply(once(cleared, source), None)
            self.reached.pop(key, None)

    def observe(self, account: str, event: ev.MessageReceived, windows, window, at: float, source: Source,
                policy: "Policy") -> ev.Event | None:
        """Count one message of ``account``; the fact to publish under ``policy``, if any."""
        if not policy.hijack.enabled:
            return None
        counts = count_once(windows, add_message, {"messages": 1, "client_ips": [event.envelope.client_ip]},
                            source, self.size - self.step)
        if counts is None:
            return None  # counted (and judged) before this delivery
        oldest = window_bounds(window.delta(at, self.size - self.step))
        fact = decide(account, counts, oldest, event, policy, event_id(event.occurred_at, source, "hijack"))
        if fact is None:
            return None
        state = self.states.get(account)
        if state is not None and not state["enabled"]:
            return None  # already disabled; its sessions are being refused
        if isinstance(fact, ev.AccountLimitReached):
            previous = self.reached.get(account)
            if previous is not None and datetime.fromisoformat(previous["until"]) > event.occurred_at:
                return None  # already at the limit for this window
            self.reached[account] = fact.model_dump(mode="json")
        else:
            # Recorded now, not only when it comes back on accounts.state,
            # so the messages in between do not disable it twice.
            self.states[account] = fact.model_dump(mode="json")
        return fact


def install(app: "faust.App", holder: Any, received: "faust.TopicT", account_state: "faust.TopicT",
            limits_topic: "faust.TopicT") -> dict:
    from faust import current_event

    from streams.eventio import decode_record, send_event
    from streams.once import source_of

    rules = holder.current.hijack
    size = timedelta(minutes=rules.window_minutes).total_seconds()
    step = size / STEPS_PER_WINDOW
    partitions = account_state.partitions

    account_messages = app.topic(
        f"{app.conf.id}-hijack-account-messages", key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=partitions, internal=True,
    )
    counters = app.Table(
        "hijack-counters", default=dict, partitions=partitions, key_type=str, value_type=None,
    ).hopping(size, step, expires=size).relative_to_stream()
    #: Latest AccountStateChanged per account (what the HTTP views list).
    states = app.Table("hijack-account-states", default=None, partitions=partitions, key_type=str)
    #: Latest AccountLimitReached per account, to publish it once per window.
    reached = app.Table("hijack-limits", default=None, partitions=partitions, key_type=str)
    detection = HijackDetector(states, reached, size, step)

    received_channel = app.topic(received.get_topic_name(), key_type=bytes, value_type=bytes,
                                 key_serializer="raw", value_serializer="raw")

    @app.agent(received_channel)
    async def hijack_messages(stream):
        await holder.start()
        async for record in stream.events():
            event = decode_record(record)
            if not isinstance(event, ev.MessageReceived):
                continue
            account = account_of(event, holder.current)
            if account is not None:
                # With its origin: a message forwarded twice (this record
                # delivered again) is counted once (streams/once.py).
                await send_event(account_messages, event, key=account.encode(),
                                 headers=[source_of(record).header()])

    channel = app.topic(account_messages.get_topic_name(), account_state.get_topic_name(),
                        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    @app.agent(channel)
    async def account_hijack_detection(stream):
        await holder.start()
        async for record in stream.events():
            event = decode_record(record)
            # Records can arrive twice (at-least-once), forwarded ones with
            # their origin: each is counted once (streams/once.py).
            source = source_of(record)
            if isinstance(event, ev.AccountStateChanged):
                detection.state_changed(event, counters[account_key(event.address)], source)
                continue
            if not isinstance(event, ev.MessageReceived) or record.key is None:
                continue
            account = record.key.decode()
            fact = detection.observe(account, event, counters[account], counters.table.window,
                                     current_event().message.timestamp, source, holder.current)
            if fact is None:
                continue
            if isinstance(fact, ev.AccountLimitReached):
                await send_event(limits_topic, fact)
                metrics.HIJACK_LIMITS.inc()
                log.warning("account %s reached its limit: %d messages; 452 until %s",
                            account, fact.messages, fact.until.isoformat(timespec="seconds"))
            else:
                await send_event(account_state, fact)
                metrics.HIJACK_DISABLED.inc()
                log.warning("account %s disabled: %s", account, fact.reason)

    return {"counters": counters, "states": states, "limits": reached, "account_messages": account_messages,
            "size": size, "step": step}

"""Dynamic Screening: count what each client address does, ban the ones that abuse.

The agent consumes ``smtp.sessions`` and ``console.logins`` (both keyed by
client IP) and keeps, per IP, event-time windowed counters in a RocksDB
table: failed RCPTs, connections, failed AUTH attempts, RSETs, sessions held
open too long and refused web console logins. When a count
crosses its limit in the policy it publishes a ``BanIssued`` to the compacted
``screening.bans`` topic. It never refuses anyone itself: ingest reads that
topic and enforces (counters count; deciders decide, as Postfix's anvil
reports and smtpd decides).

The same agent also consumes ``screening.bans`` (co-partitioned with
``smtp.sessions``: both are keyed by IP with the same partition count, so a
worker owns an IP's counters and its bans). A ban, once on the topic, enters
the ``screening-bans`` table the HTTP views read; a ``BanLifted`` removes it
and clears the IP's counters, so an unbanned client starts again from zero.

Windows. Every counter counts over the last ``window_minutes`` (fixed when
the worker starts: a Faust table's window cannot change while it runs;
thresholds follow the live policy), in ``STEPS_PER_WINDOW`` steps. The table
keeps one value per IP and step (a tumbling window of one step), and the
count "in the last M minutes" is the sum of the last five steps, which
reaches back between M - step and M. That is the count the oldest of the
hopping windows holding the event would have, but each event writes one
table value (one changelog record) instead of one per window: five times
fewer records for the busiest counter of all (connections; measured with
bench/e2e_relay.py, docs/performance.md). Windows run in event time:
``bulwark.kafka`` sets every record's timestamp to the event's
``occurred_at``, so replaying the topic gives the same counts and the same
bans.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from bulwark import metrics
from schemas import codec
from schemas import events as ev
from streams.once import APPLIED, Source, applied, cleared, event_id, once

if TYPE_CHECKING:
    import faust

    from bulwark.policy import DynamicScreening, Policy  # noqa: F401

log = logging.getLogger(__name__)

#: The counters, in the order the guide lists them.
FAILED_RCPT = "failed_rcpt"
CONNECTIONS = "connections"
FAILED_AUTH = "failed_auth"
RSET = "rset"
LONG_SESSIONS = "long_sessions"
#: Refused logins to the web console (``console.logins``): the guide's
#: failed authentication attempts, over HTTPS rather than SMTP.
FAILED_CONSOLE_LOGIN = "failed_console_login"
COUNTERS = (FAILED_RCPT, CONNECTIONS, FAILED_AUTH, RSET, LONG_SESSIONS, FAILED_CONSOLE_LOGIN)

#: What ingest's AUTH records for credentials that match no account, whatever
#: their bytes (schemas.events). Other AUTH failures (no TLS, bad syntax, a
#: guard's refusal) are not password guesses.
AUTH_GUESS_REASONS = (ev.AUTH_INVALID_CREDENTIALS, ev.AUTH_NOT_UTF8_CREDENTIALS, None)

#: Steps per window: finer steps follow "the last M minutes" more closely,
#: at the cost of a table read per step for every event.
STEPS_PER_WINDOW = 5


#: What the agent reads: the bans, and the events ``counted_as`` may count.
#: An event of another type (EHLO, MAIL, DATA, STARTTLS...) is skipped by
#: its type header, unparsed: about half of a message's session events.
READ_TYPES = frozenset(t.TYPE for t in (
    ev.BanIssued, ev.BanLifted, ev.ConsoleLoginFailed, ev.SessionConnected, ev.SessionRcpt, ev.SessionAuth,
    ev.SessionRset, ev.SessionDisconnected))


def counted_as(event: ev.Event, policy: "Policy") -> str | None:
    """The counter a session event (or a refused console login) adds to, if any."""
    if isinstance(event, ev.ConsoleLoginFailed):
        return FAILED_CONSOLE_LOGIN
    if isinstance(event, ev.SessionConnected):
        return CONNECTIONS
    if isinstance(event, ev.SessionRcpt):
        # 5xx only: unknown users and relay refusals. A 4xx is the gateway's
        # own trouble (or a rate limit), not the client's fault.
        return FAILED_RCPT if not event.accepted and event.reply_code >= 500 else None
    if isinstance(event, ev.SessionAuth):
        return FAILED_AUTH if event.outcome == "failure" and event.reason in AUTH_GUESS_REASONS else None
    if isinstance(event, ev.SessionRset):
        return RSET
    if isinstance(event, ev.SessionDisconnected):
        # Ingest ends a session at the limit (ingest/guards/limits.py), so one
        # that lasted that long is one a client tried to hold open.
        limit = policy.session_limits.max_duration_seconds
        return LONG_SESSIONS if event.duration_seconds >= limit else None
    return None


def limits(rules: "DynamicScreening") -> dict[str, int]:
    """The count at which each counter bans."""
    return {
        FAILED_RCPT: rules.failed_rcpt_limit,
        # "Ban IPs that connect more than N times": N + 1 bans.
        CONNECTIONS: rules.connection_limit + 1,
        FAILED_AUTH: rules.failed_auth_limit,
        RSET: rules.rset_limit,
        LONG_SESSIONS: rules.long_session_limit,
        FAILED_CONSOLE_LOGIN: rules.failed_console_login_limit,
    }


def crossed(counts: dict[str, int], rules: "DynamicScreening") -> list[str]:
    return [name for name, limit in limits(rules).items() if counts.get(name, 0) >= limit]


REASONS = {
    FAILED_RCPT: "{n} failed RCPTs",
    CONNECTIONS: "{n} connections",
    FAILED_AUTH: "{n} failed AUTH attempts",
    RSET: "{n} RSETs",
    LONG_SESSIONS: "{n} sessions held open longer than allowed",
    FAILED_CONSOLE_LOGIN: "{n} failed console logins",
}


def describe(over: list[str], counts: dict[str, int], minutes: int) -> str:
    return "Dynamic Screening: " + ", ".join(REASONS[c].format(n=counts[c]) for c in over) + f" in {minutes} minutes"


def exempt(policy: "Policy", ip: str) -> bool:
    """Domain mail servers and allow-listed addresses are never banned."""
    try:
        if policy.is_domain_mail_server(ip):
            return True
    except ValueError:  # not an IP address at all: nothing to ban either
        return True
    # Addresses and ranges only: host names need reverse DNS, which ingest
    # has (it also skips enforcing a ban on a session allow-listed by name).
    allow = policy.allow_list
    if "dynamic_screening" not in allow.skips:
        return False
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(net, strict=False) for net in allow.addresses)


def ban_for(event: ev.SessionEvent | ev.ConsoleLoginFailed, counts: dict[str, int], window: tuple[float, float],
            policy: "Policy", event_id: str | None = None) -> ev.BanIssued | None:
    """The ban this event's counts call for, if any. A pure function of its inputs."""
    rules = policy.screening
    over = crossed(counts, rules)
    if not over:
        return None
    return ev.BanIssued(
        **({"event_id": event_id} if event_id else {}),
        # The ban happens in event time (the event that crossed the limit),
        # so a replay issues the same ban with the same expiry.
        occurred_at=event.occurred_at,
        session_id=event.session_id,
        client_ip=event.client_ip,
        reason=describe(over, counts, rules.window_minutes),
        counters={name: int(counts.get(name, 0)) for name in COUNTERS},
        window_start=_dt(window[0]),
        window_end=_dt(window[1]),
        expires_at=event.occurred_at + timedelta(minutes=rules.ban_minutes),
    )


def _dt(timestamp: float) -> datetime:
    return datetime.fromtimestamp(round(timestamp, 3), timezone.utc)


def add_counts(old: dict | None, increment: dict) -> dict:
    """Window operation: add the increment's counts to a window's."""
    total = dict(old or {})
    for name, n in increment.items():
        total[name] = total.get(name, 0) + n
    return total


def window_bounds(window_range: tuple[float, float]) -> tuple[float, float]:
    # Faust ends a window a tenth of a second before the next step begins.
    start, end = window_range
    return start, round(end + 0.1, 3)


class StepCounters:
    """Counters per key over the last window, one table value per key and step.

    ``table`` is a Faust table with a tumbling window of one step; a value
    maps counter names to counts, plus the marks of ``streams.once`` (the
    last source offset applied to it). Keys and step ranges are read and
    written directly (``table[(key, step_range)]``): the window wrappers
    write every window of the current event, and here the one of the event
    is all that changes.
    """

    def __init__(self, table, size: float, step: float):
        self.table = table  # the Faust table, not its window wrapper
        self.size, self.step = size, step
        #: The last timestamp's steps: counting an event asks for them three times.
        self._steps_at: tuple[float, list[tuple[float, float]]] | None = None

    def steps(self, timestamp: float) -> list[tuple[float, float]]:
        """The step ranges making up the window that ends with ``timestamp``'s step, oldest first."""
        if self._steps_at is not None and self._steps_at[0] == timestamp:
            return self._steps_at[1]
        count = round(self.size / self.step)
        steps = [self.table.window.ranges(timestamp - i * self.step)[0] for i in reversed(range(count))]
        self._steps_at = (timestamp, steps)
        return steps

    def window(self, timestamp: float) -> tuple[float, float]:
        """Start and end (exclusive) of the window the counts at ``timestamp`` cover."""
        steps = self.steps(timestamp)
        return window_bounds((steps[0][0], steps[-1][1]))

    def _get(self, key: str, step_range) -> dict | None:
        return self.table.get((key, step_range))

    def counts(self, key: str, timestamp: float) -> dict[str, int]:
        """The counts over the window ending with ``timestamp``'s step."""
        total: dict[str, int] = {}
        for step_range in self.steps(timestamp):
            for name, n in (self._get(key, step_range) or {}).items():
                if name != APPLIED:
                    total[name] = total.get(name, 0) + n
        return total

    def count_once(self, key: str, timestamp: float, increment: dict[str, int], source: Source) -> dict | None:
        """Add ``increment`` to ``timestamp``'s step, once per source record.

        Returns the counts over the window, or None when this step already
        held the record: counted, and decided on, before this delivery.
        """
        step_range = self.steps(timestamp)[-1]
        old = self._get(key, step_range)
        if applied(old, source):
            return None
        self.table[(key, step_range)] = once(add_counts, source)(old, increment)
        return self.counts(key, timestamp)

    def clear(self, key: str, timestamp: float, source: Source | None = None) -> None:
        """Start the window ending with ``timestamp``'s step again from zero (keeping the marks).

        With ``source``, once per source record: a redelivered unban does
        not clear what was counted after it.
        """
        op = cleared if source is None else once(cleared, source)
        for step_range in self.steps(timestamp):
            old = self._get(key, step_range)
            if old is not None:
                self.table[(key, step_range)] = op(old, None)


class Screener:
    """What Dynamic Screening does with each record, on its counters: count, judge, ban, start again.

    The live agent (``install``) and ``bulwark replay sessions``
    (``bulwark/replay_sessions.py``) both run this, the agent over its Faust
    table and the replay over counters in memory, so a replay issues the
    bans the agent would have issued, with the same ids, and there is one
    copy of the rules. ``at`` is the record's timestamp (its event time, in
    seconds); ``source`` its origin (``streams.once``).
    """

    def __init__(self, counters: StepCounters):
        self.counters = counters

    def lifted(self, ip: str, at: float, source: Source) -> None:
        """A ``BanLifted``: the window that holds the events before the unban starts again."""
        self.counters.clear(ip, at, source)

    def observe(self, event: ev.SessionEvent | ev.ConsoleLoginFailed, at: float, source: Source,
                policy: "Policy") -> ev.BanIssued | None:
        """Count the event; the ban it calls for under ``policy``, if any."""
        counter = counted_as(event, policy)
        if counter is None or not policy.screening.enabled or exempt(policy, event.client_ip):
            return None
        ip = event.client_ip
        counts = self.counters.count_once(ip, at, {counter: 1}, source)
        if counts is None:
            return None  # counted (and judged) before this delivery
        ban = ban_for(event, counts, self.counters.window(at), policy, event_id(event.occurred_at, source, "ban"))
        if ban is None:
            return None
        # The evidence is spent: after the ban (or its early lifting) the
        # client starts from zero, so the ban is not issued again at
        # once. A client that keeps hammering while banned (refused
        # connections still count) earns a new, later ban.
        self.counters.clear(ip, at)
        return ban


def install(app: "faust.App", holder: Any, sessions: "faust.TopicT", bans: "faust.TopicT",
            console_logins: "faust.TopicT | None" = None) -> dict:
    """Declare the Dynamic Screening tables and agent on the app.

    ``console_logins`` (co-partitioned with ``sessions``) adds the web
    console's refused logins to what is counted.
    """
    from faust import current_event

    from streams.eventio import decode_record, headers_of, send_event
    from streams.once import source_of

    rules = holder.current.screening
    size = timedelta(minutes=rules.window_minutes).total_seconds()
    step = size / STEPS_PER_WINDOW

    # Steps kept one step longer than the window: the oldest step of a
    # window is still there when the window is read.
    table = app.Table(
        "screening-counts", default=None, partitions=sessions.partitions, key_type=str, value_type=None,
    ).tumbling(step, expires=size + step).relative_to_stream()
    counters = StepCounters(table.table, size, step)
    screening = Screener(counters)
    active_bans = app.Table("screening-bans", default=None, partitions=sessions.partitions, key_type=str)

    # Every topic on one channel: the assignor gives one worker the same
    # partition of each, so an IP's counters and bans live together.
    names = [sessions.get_topic_name(), bans.get_topic_name()]
    if console_logins is not None:
        names.append(console_logins.get_topic_name())
    channel = app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    @app.agent(channel)
    async def dynamic_screening(stream):
        await holder.start()
        async for record in stream.events():
            kind = codec.header(headers_of(record), codec.HEADER_TYPE)
            if kind is not None and kind not in READ_TYPES:
                continue  # most session events count for nothing: not parsed (the header says what it is)
            event = decode_record(record)
            # Records can arrive twice (at-least-once): every counter update
            # is applied once per source record (streams/once.py).
            source = source_of(record)
            if isinstance(event, ev.BanIssued):
                active_bans[event.client_ip] = event.model_dump(mode="json")
                continue
            if isinstance(event, ev.BanLifted):
                active_bans.pop(event.client_ip, None)
                screening.lifted(event.client_ip, current_event().message.timestamp, source)
                continue
            if not isinstance(event, (ev.SessionEvent, ev.ConsoleLoginFailed)):
                continue
            policy = holder.current
            ban = screening.observe(event, current_event().message.timestamp, source, policy)
            if ban is None:
                continue
            await send_event(bans, ban)
            metrics.BANS.inc()
            for name in crossed(ban.counters, policy.screening):
                metrics.BAN_TRIGGERS.labels(counter=name).inc()
            log.warning("banned %s until %s: %s", ban.client_ip, ban.expires_at.isoformat(timespec="seconds"),
                        ban.reason)

    return {"counters": counters, "bans": active_bans, "agent": dynamic_screening, "size": size, "step": step}

"""``bulwark replay sessions``: which bans, limits and disables the session counters would have issued.

Dynamic Screening counts what each client address does on ``smtp.sessions``
(and ``console.logins``) and bans; Account Hijack Detection counts each
account's messages on ``mail.received`` and limits or disables it. A session
replay reads those topics (and what the agents follow besides: the lifted
bans on ``screening.bans``, the accounts an administrator enabled or
disabled on ``accounts.state``), in event time, and runs the agents' own
code on them (``streams.screening.Screener``,
``streams.hijack.HijackDetector``, over counters in memory instead
of Faust tables):

(a) under the policy version in force when each event happened (from
    ``config.policy``; before any was published, the local policy file,
    as a worker would have started with). The facts it issues carry the
    same event ids as the live agent's (``streams.once.event_id``), so each
    one still on ``screening.bans``, ``hijack.limits`` or ``accounts.state``
    is matched exactly: a recorded fact the replay does not issue is a
    difference.
(b) under a candidate policy file: the facts it would issue, and, client
    address by client address and account by account, where they differ
    from (a), with the settings that explain it.

What it cannot know: what a client would have done had it not been banned,
or an account not been limited. Both runs count the events as they were
recorded (the connections a banned client kept making are counted, as the
live agent counts them).

Counting needs the events before the selected time: the reading starts one
window (plus one step) before ``since``, and only facts from ``since`` on
are reported. Like a worker, a run keeps the window length it starts with
(the policy in force at the start, or the candidate's); thresholds follow
each event's policy.

It reads with its own consumer (assigned partitions, no group, no commits)
and writes to no topic unless asked to publish what it found
(``forensics.replay``).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import confluent_kafka

from bulwark.policy import Policy, PolicyError, load
from bulwark.replay import BATCH, PolicyArchive, _reader, gc_paused
from bulwark.settings import Settings
from schemas import codec
from schemas import events as ev
from schemas.topics import ACCOUNT_STATE, BANS, CONSOLE_LOGINS, HIJACK_LIMITS, RECEIVED, SESSIONS, TopicSpec
from streams import hijack, screening
from streams.once import Source

log = logging.getLogger(__name__)

SCREENING = "screening"
HIJACK = "hijack"

#: What each topic contributes, by the record's type header: nothing else is decoded.
SCREENING_TYPES = {
    SESSIONS.name: {ev.SessionConnected.TYPE, ev.SessionRcpt.TYPE, ev.SessionAuth.TYPE, ev.SessionRset.TYPE,
                    ev.SessionDisconnected.TYPE},
    CONSOLE_LOGINS.name: {ev.ConsoleLoginFailed.TYPE},
    # Lifted bans clear the counters (inputs); issued ones are what the live agent decided (to compare).
    BANS.name: {ev.BanLifted.TYPE, ev.BanIssued.TYPE},
}
HIJACK_TYPES = {
    RECEIVED.name: {ev.MessageReceived.TYPE},
    # Administrators' changes are inputs; the agent's own disables are compared.
    ACCOUNT_STATE.name: {ev.AccountStateChanged.TYPE},
    HIJACK_LIMITS.name: {ev.AccountLimitReached.TYPE},
}
TOPICS = {spec.name: spec for spec in (SESSIONS, CONSOLE_LOGINS, BANS, RECEIVED, ACCOUNT_STATE, HIJACK_LIMITS)}


@dataclass(frozen=True)
class Selection:
    """Which events to replay. A client address selects Dynamic Screening, an account Account Hijack Detection."""

    since: datetime | None = None
    until: datetime | None = None
    client_ips: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    #: Which of the two: both unless only addresses or only accounts are selected.
    features: frozenset[str] = frozenset({SCREENING, HIJACK})

    @classmethod
    def of(cls, since=None, until=None, client_ips=(), accounts=(), features=()) -> "Selection":
        ips, names = frozenset(client_ips), frozenset(hijack.account_key(a) for a in accounts)
        if not features:
            features = {SCREENING, HIJACK}
            if ips and not names:
                features = {SCREENING}
            elif names and not ips:
                features = {HIJACK}
        return cls(since, until, ips, names, frozenset(features))

    def as_json(self) -> dict:
        return {"since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
                "client_ips": sorted(self.client_ips), "accounts": sorted(self.accounts),
                "features": sorted(self.features)}

    def reported(self, when: datetime) -> bool:
        return (self.since is None or when >= self.since) and (self.until is None or when <= self.until)


@dataclass(order=True)
class Input:
    """One record to replay, in event time."""

    at_ms: int
    topic: str = field(compare=False)
    partition: int = field(compare=False)
    offset: int = field(compare=False)
    event: ev.Event = field(compare=False)

    @property
    def source(self) -> Source:
        # What streams.once.source_of gives the live agent for this record.
        return Source(f"{self.topic}/{self.partition}", self.offset)


@dataclass
class ReadStats:
    read: int = 0
    decoded: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


def _needles(selection: Selection, topic: str) -> tuple[set[bytes] | None, tuple[bytes, ...]]:
    """(record keys to keep, or None for any; byte strings one of which the lower-cased value must hold)."""
    if topic in (SESSIONS.name, CONSOLE_LOGINS.name, BANS.name):
        return ({ip.encode() for ip in selection.client_ips} or None), ()
    if topic in (ACCOUNT_STATE.name, HIJACK_LIMITS.name):
        # Keyed by the account as ingest keys it (lower-cased).
        return ({a.encode() for a in selection.accounts} or None), ()
    if topic == RECEIVED.name and selection.accounts and all(a.isascii() for a in selection.accounts):
        return None, tuple(a.encode() for a in selection.accounts)
    return None, ()


def read(settings: Settings, selection: Selection, start: datetime | None, stats: ReadStats | None = None,
         progress: Callable[[int, int], None] | None = None) -> list[Input]:
    """The records the selected features count, from ``start``, merged in event time.

    Each partition is read in offset order and the merge keeps that order
    within a partition, as a worker reads them.
    """
    with gc_paused():  # (as bulwark.replay reads, and for the same reason)
        return _read(settings, selection, start, stats, progress)


def _read(settings: Settings, selection: Selection, start: datetime | None, stats: ReadStats | None,
          progress: Callable[[int, int], None] | None) -> list[Input]:
    stats = stats if stats is not None else ReadStats()
    began = time.perf_counter()
    wanted: dict[str, set[str]] = {}
    if SCREENING in selection.features:
        wanted.update(SCREENING_TYPES)
    if HIJACK in selection.features:
        wanted.update(HIJACK_TYPES)
    until_ms = int(selection.until.timestamp() * 1000) if selection.until else None
    start_ms = int(start.timestamp() * 1000) if start else None
    consumer = _reader(settings)
    streams: dict[tuple[str, int], list[Input]] = {}
    try:
        ranges = _ranges(consumer, [TOPICS[name] for name in wanted], start_ms)
        total = sum(end - begin for begin, end in ranges.values())
        filters = {name: (_needles(selection, name), {t.encode() for t in types}) for name, types in wanted.items()}
        remaining = set(ranges)
        consumer.assign([confluent_kafka.TopicPartition(t, p, begin) for (t, p), (begin, _) in ranges.items()])
        reported = 0
        while remaining:
            for msg in consumer.consume(num_messages=BATCH, timeout=0.2):
                tp = (msg.topic(), msg.partition())
                if msg.error() is not None:
                    if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        remaining.discard(tp)
                    continue
                offset, end = msg.offset(), ranges[tp][1]
                if offset >= end:
                    remaining.discard(tp)
                    continue
                if offset + 1 >= end:
                    remaining.discard(tp)
                stats.read += 1
                at_ms = msg.timestamp()[1]
                if until_ms is not None and at_ms > until_ms:
                    continue
                (keys, needles), types = filters[tp[0]]
                if keys is not None and msg.key() not in keys:
                    continue
                headers = msg.headers() or ()
                kind = next((v for k, v in headers if k == codec.HEADER_TYPE), None)
                if kind is not None and kind not in types:
                    continue
                value = msg.value()
                if needles:
                    folded = value.lower()
                    if not any(n in folded for n in needles):
                        continue
                try:
                    event = _decode(value, headers, kind)
                except ValueError as exc:
                    log.warning("skipping %s[%d]@%d: %s", tp[0], tp[1], offset, exc)
                    continue
                stats.decoded += 1
                streams.setdefault(tp, []).append(Input(at_ms, tp[0], tp[1], offset, event))
            if progress is not None and stats.read - reported >= 5000:
                progress(stats.read, total)
                reported = stats.read
        if progress is not None:
            progress(stats.read, total)
    finally:
        consumer.close()
        stats.seconds = time.perf_counter() - began
    return list(heapq.merge(*streams.values()))


def _decode(value: bytes, headers, kind: bytes | None) -> ev.Event:
    """``codec.decode``, with pydantic parsing the JSON itself when the record is of the current version.

    Three times faster for a session event (33 against 98 microseconds here),
    and decoding is most of a session replay's reading. An older version, or
    a record without headers, goes through the codec and its upcasters; a
    body that is not what its headers say fails validation either way.
    """
    cls = ev.EVENT_TYPES.get(kind.decode()) if kind is not None else None
    if cls is not None and codec.header(headers, codec.HEADER_VERSION) == str(cls.VERSION):
        return cls.model_validate_json(value)
    return codec.decode(value, headers)


def _ranges(consumer: confluent_kafka.Consumer, specs: Iterable[TopicSpec],
            start_ms: int | None) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (first offset to read, end), for the partitions with anything to read."""
    ranges = {}
    for spec in specs:
        for p in range(spec.partitions):
            ranges[(spec.name, p)] = consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(spec.name, p), timeout=10)
    if start_ms is not None and ranges:
        found = consumer.offsets_for_times(
            [confluent_kafka.TopicPartition(t, p, start_ms) for (t, p) in ranges], timeout=10)
        for tp in found:
            low, high = ranges[(tp.topic, tp.partition)]
            ranges[(tp.topic, tp.partition)] = (tp.offset if tp.offset >= 0 else high, high)
    return {tp: r for tp, r in ranges.items() if r[0] < r[1]}


class PolicyTimeline:
    """The policy in force at any time: the last one published on ``config.policy`` before it.

    Before the first one, the local policy file (what a worker started with).
    """

    def __init__(self, archive: PolicyArchive, local: Policy | None):
        self.archive = archive
        self.local = local
        published = sorted(archive.published.values(), key=lambda e: e.occurred_at)
        self.times = [e.timestamp_ms for e in published]
        self.versions = [e.policy_version for e in published]

    def at(self, at_ms: int) -> Policy | None:
        i = bisect.bisect_right(self.times, at_ms)
        if i == 0:
            return self.local
        # A version that no longer validates: the newest earlier one that does.
        for version in reversed(self.versions[:i]):
            policy = self.archive.get(version)
            if policy is not None:
                return policy
        return self.local


class _Steps(dict):
    """A Faust windowed table's contents in memory: (key, window range) -> value, and its window."""

    def __init__(self, window):
        super().__init__()
        self.window = window

    def expire(self, before: float) -> None:
        """Drop the windows that ended before ``before`` (what Faust's table cleanup does)."""
        for key in [k for k in self if k[1][1] < before]:
            del self[key]


class _AccountWindows:
    """One account's hopping windows at one record's time: what ``table[account]`` is to the live agent."""

    def __init__(self, store: _Steps, key: str, at: float):
        self.store, self.key, self.at = store, key, at

    def apply(self, op, value) -> None:
        for window_range in self.store.window.ranges(self.at):
            self.store[(self.key, window_range)] = op(self.store.get((self.key, window_range), {}), value)

    def delta(self, d: float) -> dict:
        return self.store.get((self.key, self.store.window.delta(self.at, d)), {})


@dataclass
class Fact:
    """A ban, a limit or a disable, as a person reads it."""

    kind: str  # ban, limit, disable
    subject: str  # the client address or the account
    at: str
    until: str | None
    reason: str
    policy_version: str
    event_id: str

    @classmethod
    def of(cls, event: ev.Event, policy_version: str) -> "Fact":
        if isinstance(event, ev.BanIssued):
            return cls("ban", event.client_ip, event.occurred_at.isoformat(), event.expires_at.isoformat(),
                       event.reason, policy_version, event.event_id)
        if isinstance(event, ev.AccountLimitReached):
            return cls("limit", event.address, event.occurred_at.isoformat(), event.until.isoformat(),
                       f"{event.messages} messages (limit {event.limit})", policy_version, event.event_id)
        assert isinstance(event, ev.AccountStateChanged)
        return cls("disable", event.address, event.occurred_at.isoformat(), None, event.reason, policy_version,
                   event.event_id)

    def short(self) -> str:
        when = datetime.fromisoformat(self.at).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.kind} at {when} ({self.reason})"


def _automatic_disable(event: ev.Event) -> bool:
    return isinstance(event, ev.AccountStateChanged) and not event.enabled and event.by == hijack.HIJACK_DETECTION


def run(inputs: list[Input], selection: Selection, policy_at: Callable[[int], Policy | None],
        screening_minutes: int, hijack_minutes: int,
        progress: Callable[[int, int], None] | None = None) -> tuple[list[Fact], int]:
    """Run the agents' code over the inputs; (the facts issued in the selected time, events counted).

    ``policy_at(ms)`` is the policy an event of that time is judged under;
    ``progress(done, total)`` is called every few thousand inputs.
    """
    size_s = timedelta(minutes=screening_minutes).total_seconds()
    step_s = size_s / screening.STEPS_PER_WINDOW
    from faust.windows import HoppingWindow, TumblingWindow  # the window arithmetic the agents' tables use

    steps = _Steps(TumblingWindow(step_s, expires=size_s + step_s))
    dynamic = screening.Screener(screening.StepCounters(steps, size_s, step_s))
    size_h = timedelta(minutes=hijack_minutes).total_seconds()
    step_h = size_h / screening.STEPS_PER_WINDOW
    accounts = _Steps(HoppingWindow(size_h, step_h, expires=size_h))
    detection = hijack.HijackDetector({}, {}, size_h, step_h)
    facts: list[Fact] = []
    counted = 0
    expired_at = 0.0
    for done, item in enumerate(inputs):
        if progress is not None and done % 5000 == 0:
            progress(done, len(inputs))
        event, at = item.event, item.at_ms / 1000
        if at - expired_at > size_s + size_h:
            steps.expire(at - size_s - 2 * step_s)
            accounts.expire(at - 2 * size_h)
            expired_at = at
        fact: ev.Event | None = None
        policy = policy_at(item.at_ms)
        if policy is None:
            continue
        if isinstance(event, ev.BanLifted):
            dynamic.lifted(event.client_ip, at, item.source)
        elif isinstance(event, (ev.SessionEvent, ev.ConsoleLoginFailed)):
            counted += 1
            fact = dynamic.observe(event, at, item.source, policy)
        elif isinstance(event, ev.AccountStateChanged):
            if not _automatic_disable(event):  # the agent's own disables are what is replayed
                detection.state_changed(event, _AccountWindows(accounts, hijack.account_key(event.address), at),
                                        item.source)
        elif isinstance(event, ev.MessageReceived):
            account = hijack.account_of(event, policy)
            if account is None or (selection.accounts and account not in selection.accounts):
                continue
            counted += 1
            fact = detection.observe(account, event, _AccountWindows(accounts, account, at), accounts.window, at,
                                     item.source, policy)
        if fact is not None and selection.reported(fact.occurred_at):
            facts.append(Fact.of(fact, policy.version))
    if progress is not None:
        progress(len(inputs), len(inputs))
    return facts, counted


def recorded_facts(inputs: list[Input], selection: Selection) -> list[Fact]:
    """The facts the live agents published in the selected time, as far as the topics still hold them."""
    out = []
    for item in inputs:
        event = item.event
        if isinstance(event, (ev.BanIssued, ev.AccountLimitReached)) or _automatic_disable(event):
            if selection.reported(event.occurred_at):  # (the selected keys were read, no others)
                out.append(Fact.of(event, "?"))
    return out


@dataclass
class Difference:
    """One client address or account whose facts differ between two runs."""

    subject: str
    feature: str
    recorded: list[Fact]
    candidate: list[Fact]
    causes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def summary(facts: list[Fact]) -> str:
        if not facts:
            return "none"
        first = facts[0].short()
        return first if len(facts) == 1 else f"{len(facts)}: first {first}"


def _setting_changes(section: str, then: Policy, now: Policy) -> list[str]:
    old, new = getattr(then, section), getattr(now, section)
    return [f"{section}.{name}: {getattr(old, name)} under {then.version}, {getattr(new, name)} in the candidate"
            for name in type(old).model_fields if getattr(old, name) != getattr(new, name)]


def differences(recorded: list[Fact], candidate: list[Fact], candidate_policy: Policy,
                policy_of: Callable[[str], Policy | None], local: Policy | None) -> list[Difference]:
    """Subject by subject, where the candidate's facts are not the recorded policies' ones (times and kinds)."""
    def by_subject(facts):
        grouped: dict[str, list[Fact]] = {}
        for f in facts:
            grouped.setdefault(f.subject, []).append(f)
        return grouped

    then, now = by_subject(recorded), by_subject(candidate)
    out = []
    for subject in sorted(then.keys() | now.keys()):
        a, b = then.get(subject, []), now.get(subject, [])
        if [(f.kind, f.at) for f in a] == [(f.kind, f.at) for f in b]:
            continue
        feature = SCREENING if (a or b)[0].kind == "ban" else HIJACK
        versions = sorted({f.policy_version for f in a}) or ([local.version] if local else [])
        causes: list[str] = []
        for version in versions:
            old = policy_of(version)
            if old is None:
                continue
            causes += _setting_changes("screening" if feature == SCREENING else "hijack", old, candidate_policy)
            was, is_ = (feature == SCREENING and screening.exempt(p, subject) for p in (old, candidate_policy))
            if was != is_:
                said = {True: "exempt", False: "not exempt"}
                causes.append(f"{subject} is {said[is_]} in the candidate (allow list or domain mail servers), "
                              f"{said[was]} under {old.version}")
        out.append(Difference(subject, feature, a, b, list(dict.fromkeys(causes)) or
                              ["the same settings: the window length or the order of events differs"]))
    return out


@dataclass
class Report:
    selection: Selection
    read: ReadStats
    counted: int
    recorded_policies: list[Fact]
    on_topics: list[Fact]
    candidate_version: str | None = None
    candidate: list[Fact] | None = None
    differences: list[Difference] | None = None

    @property
    def not_reproduced(self) -> list[Fact]:
        """Facts the live agents published that the replay under the recorded policies does not issue."""
        issued = {f.event_id for f in self.recorded_policies}
        return [f for f in self.on_topics if f.event_id not in issued]

    def as_json(self) -> dict:
        return {
            "mode": "candidate" if self.candidate is not None else "recorded",
            "candidate_policy": self.candidate_version,
            "selection": self.selection.as_json(),
            "read": self.read.read, "counted": self.counted, "read_seconds": round(self.read.seconds, 3),
            "read_per_second": round(self.read.per_second),
            "recorded_policies": [asdict(f) for f in self.recorded_policies],
            "on_topics": len(self.on_topics),
            "not_reproduced": [asdict(f) for f in self.not_reproduced],
            "candidate": [asdict(f) for f in self.candidate] if self.candidate is not None else None,
            "differences": [d.as_json() for d in self.differences] if self.differences is not None else None,
        }


async def replay(settings: Settings, selection: Selection, candidate: Policy | None = None,
                 progress: Callable[[str], Callable[[int, int], None]] | None = None) -> Report:
    """Read, then run under the recorded policies and, with ``candidate``, under it; compare.

    ``progress(what)`` gives the ``(done, total)`` callback of each step (reading, each run).
    """
    def step(what: str):
        return progress(what) if progress is not None else None

    archive = await PolicyArchive.read(settings)
    try:
        local = load(settings.policy_path)
    except (PolicyError, OSError):
        local = None
    timeline = PolicyTimeline(archive, local)
    since_ms = int(selection.since.timestamp() * 1000) if selection.since else None
    first = timeline.at(since_ms if since_ms is not None else 0)
    # Counting starts a window (and a step) before the selected time, for the longest window either run uses.
    minutes = [p.screening.window_minutes for p in (first, candidate) if p is not None]
    minutes += [p.hijack.window_minutes for p in (first, candidate) if p is not None]
    start = None
    if selection.since is not None:
        longest = max(minutes or [60])
        start = selection.since - timedelta(minutes=longest + longest / screening.STEPS_PER_WINDOW)
    stats = ReadStats()
    inputs = read(settings, selection, start, stats, step("reading the session topics"))
    fallback = first or candidate
    if fallback is None:
        raise PolicyError(f"no policy on config.policy and none readable at {settings.policy_path}")
    recorded, counted = run(inputs, selection, timeline.at, fallback.screening.window_minutes,
                            fallback.hijack.window_minutes, step("counting under the recorded policies"))
    report = Report(selection, stats, counted, recorded, recorded_facts(inputs, selection))
    if candidate is not None:
        report.candidate_version = candidate.version
        report.candidate, _ = run(inputs, selection, lambda _ms: candidate, candidate.screening.window_minutes,
                                  candidate.hijack.window_minutes, step("counting under the candidate"))
        report.differences = differences(recorded, report.candidate, candidate,
                                         lambda v: archive.get(v) or (local if local and local.version == v else None),
                                         local)
    return report


def table(report: Report, show_all: bool = False) -> str:
    """Text for a terminal: the differences (candidate), or the facts the recorded policies issue."""
    lines = []
    if report.differences is not None:
        if report.differences:
            lines.append(f"{'subject':32}  {'recorded policies':44}  {'candidate':44}  why")
            for d in report.differences:
                lines.append(f"{d.subject[:32]:32}  {Difference.summary(d.recorded)[:44]:44}  "
                             f"{Difference.summary(d.candidate)[:44]:44}  {'; '.join(d.causes)}")
        if not show_all:
            return "\n".join(lines)
        lines.append("")
    facts = report.recorded_policies
    if facts:
        on_topics = {f.event_id for f in report.on_topics}
        lines.append(f"{'at':19}  {'fact':7}  {'subject':32}  {'until':19}  {'policy':14}  {'on topic':8}  reason")
        for f in facts:
            when = datetime.fromisoformat(f.at).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            until = (datetime.fromisoformat(f.until).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                     if f.until else "-")
            lines.append(f"{when:19}  {f.kind:7}  {f.subject[:32]:32}  {until:19}  {f.policy_version[:14]:14}  "
                         f"{'yes' if f.event_id in on_topics else 'no':8}  {f.reason}")
    for f in report.not_reproduced:
        lines.append(f"not reproduced: {f.short()} [{f.subject}], event {f.event_id}")
    return "\n".join(lines)

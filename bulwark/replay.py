"""``bulwark replay``: judge recorded messages again, under their own policy or a candidate one.

The verdicts on ``mail.verdicts`` carry everything a replay needs: the
envelope (so the blob store key of the raw message), the client, the
direction, every check result, the action and the policy version. A replay
selects verdicts (time range, sender, recipient, domain, client address,
action, result, policy version), loads each raw message from the blob store
and runs what the content agent runs (``streams/app.py`` ``judge``): every
enabled check (``streams.checks.run_checks``), then ``streams.verdict.decide``.

(a) Under the policy version each message was judged under (read from
    ``config.policy``, which keeps every version): the verdict should be the
    one recorded. Any difference is reported with its cause, found by
    comparing the results check by check: a newer signature database, DNS
    records that changed since (sender authentication), a check that failed
    then or now, or the same results decided otherwise (the code changed).
(b) Under a candidate policy file: which messages would change action, and
    why (the results that would decide, or no longer decide, and what the
    candidate says of them).

A replay reads with its own consumer, assigned to partitions (no group, no
commits) and writes nothing to any topic. Outbreak marks are taken from
``outbreak.alerts`` as they stood when each message was judged.

Reading is the part that must be fast (millions of verdicts, few selected):
records outside the time range are skipped by their timestamp, other types
by their header, and the rest are filtered on their parsed JSON before any
is turned into an event (``bench/replay_throughput.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from datetime import datetime, timezone

import confluent_kafka
import orjson

from bulwark.blobstore import BlobStore
from bulwark.kafka import assigned_reader_config, read_topics
from bulwark.policy import Policy, PolicyError, from_document, load
from bulwark.settings import Settings
from schemas import codec
from schemas import events as ev
from schemas.topics import OUTBREAK_ALERTS, POLICY, VERDICTS

log = logging.getLogger(__name__)

#: Checks whose answer comes from other domains' DNS records, which change.
DNS_CHECKS = {"spf", "dkim", "dmarc", "arc"}
#: What a result's ``version`` names, for a cause a person can read.
VERSION_OF = {"antivirus": "signature database", "macros": "signature database"}


@dataclass(frozen=True)
class Selection:
    """Which recorded verdicts to replay. Empty sets select everything."""

    since: datetime | None = None
    until: datetime | None = None
    senders: frozenset[str] = frozenset()
    recipients: frozenset[str] = frozenset()
    #: A domain matches the sender's or any recipient's.
    domains: frozenset[str] = frozenset()
    client_ips: frozenset[str] = frozenset()
    actions: frozenset[str] = frozenset()
    #: Result names that must be among the recorded results with outcome hit or fail.
    results: frozenset[str] = frozenset()
    policy_versions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, since=None, until=None, senders=(), recipients=(), domains=(), client_ips=(), actions=(),
           results=(), policy_versions=()) -> "Selection":
        low = lambda values: frozenset(v.lower() for v in values)  # noqa: E731
        return cls(since, until, low(senders), low(recipients), low(domains), frozenset(client_ips),
                   frozenset(actions), frozenset(results), frozenset(policy_versions))

    def may_match(self, raw: bytes) -> bool:
        """False when the raw record cannot match: most records of a selective replay are dropped unparsed."""
        folded = None
        for fold, alternatives in self.needles:
            haystack = raw
            if fold:
                if folded is None:
                    folded = raw.lower()
                haystack = folded
            for needle in alternatives:
                if needle in haystack:
                    break
            else:
                return False
        return True

    @cached_property
    def prefilter(self) -> Callable[[bytes], bool] | None:
        """``may_match``, or None when every record may match; the common shapes without a loop per record."""
        needles = self.needles
        if not needles:
            return None
        if len(needles) == 1:
            fold, alternatives = needles[0]
            if len(alternatives) == 1:
                [needle] = alternatives
                if fold:
                    return lambda raw: needle in raw.lower()
                return lambda raw: needle in raw
        return self.may_match

    @cached_property
    def needles(self) -> list[tuple[bool, tuple[bytes, ...]]]:
        """Byte strings the raw record must contain (one of each tuple; lowercased first when the flag says so).

        ``matches`` still decides: this only finds what cannot match.
        """
        quoted = lambda values: tuple(orjson.dumps(v) for v in values)  # noqa: E731
        found = []
        for values, fold in ((self.senders, True), (self.recipients, True), (self.client_ips, False),
                             (self.actions, False), (self.results, False), (self.policy_versions, False)):
            # bytes.lower() folds ASCII only: an address beyond it is left to ``matches``.
            if values and all(v.isascii() for v in values):
                found.append((fold, quoted(values)))
        if self.domains and all(d.isascii() for d in self.domains):
            found.append((True, tuple(f"@{d}".encode() for d in self.domains)))
        return found

    def matches(self, data: dict) -> bool:
        """On a verdict's JSON, as recorded (v1 and v2 verdicts share these fields)."""
        envelope = data["envelope"]
        if self.actions and data["action"] not in self.actions:
            return False
        if self.client_ips and envelope["client_ip"] not in self.client_ips:
            return False
        if self.policy_versions and data["policy_version"] not in self.policy_versions:
            return False
        sender = envelope["mail_from"].lower()
        if self.senders and sender not in self.senders:
            return False
        if self.recipients or self.domains:
            rcpts = [r.lower() for r in envelope["rcpt_to"]]
            if self.recipients and not self.recipients.intersection(rcpts):
                return False
            if self.domains:
                domains = {sender.rpartition("@")[2], *(r.rpartition("@")[2] for r in rcpts)}
                if not self.domains & domains:
                    return False
        if self.results and not any(r["name"] in self.results and r["outcome"] != "pass" for r in data["results"]):
            return False
        return True


@dataclass
class ReadStats:
    read: int = 0
    selected: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


def _reader(settings: Settings) -> confluent_kafka.Consumer:
    # Large fetches: a replay reads a topic from end to end.
    return confluent_kafka.Consumer(assigned_reader_config(settings, "bulwark-replay", **{
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
    }))


#: Records taken from the client per call: fewer calls from Python, each handing over more.
BATCH = 20000


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while a replay reads.

    A read allocates a Python object per record (the client's message and
    its headers) and keeps every selected record's parsed JSON: the
    allocations trigger the collector again and again, and each older
    generation's pass walks everything kept so far. Profiled with py-spy
    (bench/replay_throughput.py, a ``--since`` selection): 8% of the read was
    the collector. Nothing a read makes is cyclic, so reference counting
    frees it all the same.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ranges(consumer: confluent_kafka.Consumer, since_ms: int | None) -> dict[int, tuple[int, int]]:
    """partition -> (first offset to read, end) of mail.verdicts; ``since`` found by timestamp."""
    ranges = {}
    for p in range(VERDICTS.partitions):
        ranges[p] = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(VERDICTS.name, p), timeout=10)
    if since_ms is not None:
        found = consumer.offsets_for_times(
            [confluent_kafka.TopicPartition(VERDICTS.name, p, since_ms) for p in ranges], timeout=10)
        for tp in found:
            # -1: nothing stamped at or after `since` in this partition
            low, high = ranges[tp.partition]
            ranges[tp.partition] = (tp.offset if tp.offset >= 0 else high, high)
    return {p: r for p, r in ranges.items() if r[0] < r[1]}


def _scan(consumer: confluent_kafka.Consumer, selection: Selection, ranges: dict[int, tuple[int, int]],
          progress: Callable[[int], None] | None = None) -> tuple[int, list[dict]]:
    """Read mail.verdicts over these ranges; (records read, the selected verdicts' JSON).

    The loop runs once per record, so it does as little as it can: no
    timestamp unless there is an ``until``, the cheapest byte test first.
    """
    until_ms = int(selection.until.timestamp() * 1000) if selection.until else None
    may_match, matches = selection.prefilter, selection.matches
    last = {p: end - 1 for p, (_, end) in ranges.items()}
    remaining = set(last)
    read, reported = 0, 0
    selected: list[dict] = []
    seen: set[str] = set()
    verdict_type, verdict_version = ev.Verdict.TYPE, ev.Verdict.VERSION
    consumer.assign([confluent_kafka.TopicPartition(VERDICTS.name, p, start) for p, (start, _) in ranges.items()])
    while remaining:
        batch = consumer.consume(num_messages=BATCH, timeout=0.2)
        for msg in batch:
            if msg.error() is not None:
                if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                continue
            offset, end = msg.offset(), last[msg.partition()]
            if offset >= end:
                remaining.discard(msg.partition())
                if offset > end:  # written after the replay began
                    continue
            read += 1
            if until_ms is not None and msg.timestamp()[1] > until_ms:
                continue
            value = msg.value()
            if may_match is not None and not may_match(value):
                continue
            try:
                data = orjson.loads(value)
                if data.get("type") != verdict_type:  # a message.refused
                    continue
                if data.get("version") != verdict_version:
                    data = codec.upcast(data)
                if not matches(data):
                    continue
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("skipping %s[%d]@%d: %s", VERDICTS.name, msg.partition(), offset, exc)
                continue
            if data["message_id"] in seen:  # a verdict published twice (a worker crashed after sending)
                continue
            seen.add(data["message_id"])
            selected.append(data)
        if progress is not None and read - reported >= 5000:
            progress(read)
            reported = read
    if progress is not None:
        progress(read)
    return read, selected


def select(settings: Settings, selection: Selection, stats: ReadStats | None = None,
           progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """The selected verdicts' JSON (upcast to the current version), the first verdict of each message only.

    ``progress(read_so_far, total)`` is called every few thousand records.
    """
    stats = stats if stats is not None else ReadStats()
    began = time.perf_counter()
    selected: list[dict] = []
    try:
        since_ms = int(selection.since.timestamp() * 1000) if selection.since else None
        # One consumer for the offsets and the reading: its connections are made once.
        consumer = _reader(settings)
        try:
            ranges = _ranges(consumer, since_ms)
            total = sum(end - start for start, end in ranges.values())
            report = (lambda read: progress(read, total)) if progress else None
            with gc_paused():
                stats.read, selected = _scan(consumer, selection, ranges, report)
        finally:
            consumer.close()
        return selected
    finally:
        stats.selected = len(selected)
        stats.seconds = time.perf_counter() - began


class PolicyArchive:
    """Every policy version ever applied, from ``config.policy`` (compacted, keyed by version)."""

    def __init__(self, settings: Settings, published: dict[str, ev.PolicyPublished],
                 known: dict[str, Policy] | None = None):
        self.settings = settings
        self.published = published
        self._loaded: dict[str, Policy | None] = dict(known or {})

    @classmethod
    async def read(cls, settings: Settings) -> "PolicyArchive":
        records = await read_topics(settings, [POLICY.name])
        return cls(settings, {r.event.policy_version: r.event for r in records
                              if isinstance(r.event, ev.PolicyPublished)})

    def get(self, version: str) -> Policy | None:
        if version not in self._loaded:
            self._loaded[version] = self._load(version)
        return self._loaded[version]

    def _load(self, version: str) -> Policy | None:
        event = self.published.get(version)
        if event is not None:
            try:
                return from_document(event.document, f"config.policy ({event.source})", version=version)
            except PolicyError as exc:
                log.error("policy %s on config.policy no longer validates: %s", version, exc)
                return None
        # Judged before any policy was published: the local file, if it is that version.
        try:
            policy = load(self.settings.policy_path)
        except (PolicyError, OSError):
            return None
        return policy if policy.version == version else None


#: The time a message was judged at, while it is replayed (outbreak marks as of then).
AS_OF: contextvars.ContextVar[datetime | None] = contextvars.ContextVar("replay_as_of", default=None)


class MarksAsOf(Mapping):
    """``streams.outbreak.ACTIVE`` for a replay: the marks made before the message being replayed was judged."""

    def __init__(self, alerts: dict[str, ev.OutbreakDetected]):
        self.alerts = alerts

    def _visible(self, alert: ev.OutbreakDetected) -> bool:
        when = AS_OF.get()
        return when is None or alert.occurred_at <= when

    def __getitem__(self, fingerprint: str) -> dict:
        alert = self.alerts[fingerprint]
        if not self._visible(alert):
            raise KeyError(fingerprint)
        return alert.model_dump(mode="json")

    def __iter__(self):
        return (f for f, a in self.alerts.items() if self._visible(a))

    def __len__(self):
        return sum(1 for _ in self)


@dataclass
class Outcome:
    message_id: str
    judged_at: str
    sender: str
    recipients: list[str]
    client_ip: str
    recorded_action: str
    recorded_reasons: list[str]
    recorded_policy: str
    replayed_action: str | None = None
    replayed_reasons: list[str] = field(default_factory=list)
    replayed_policy: str | None = None
    #: (a): the verdict differs from the recorded one; (b): the action would change.
    changed: bool = False
    causes: list[str] = field(default_factory=list)
    #: Why it could not be replayed (no raw message, unknown policy version).
    error: str | None = None

    def as_json(self) -> dict:
        return asdict(self)


def _outcome(recorded: ev.Verdict) -> Outcome:
    e = recorded.envelope
    return Outcome(recorded.message_id, recorded.occurred_at.isoformat(), e.mail_from, list(e.rcpt_to), e.client_ip,
                   recorded.action, list(recorded.reasons), recorded.policy_version)


def result_causes(recorded: list[ev.CheckResult], replayed: list[ev.CheckResult]) -> list[str]:
    """Each result that differs between two runs of the checks, and the likely reason."""
    then = {(r.check, r.name): r for r in recorded}
    now = {(r.check, r.name): r for r in replayed}

    def versions(results: list[ev.CheckResult], check: str) -> str:
        return ", ".join(sorted({r.version for r in results if r.check == check and r.version})) or "?"

    causes = []
    for key in sorted(then.keys() | now.keys()):
        old, new = then.get(key), now.get(key)
        if old is not None and new is not None and old.outcome == new.outcome:
            continue
        if (old is None or old.outcome == "pass") and (new is None or new.outcome == "pass"):
            continue  # a clean result named or not: nothing that could weigh on a verdict
        check, name = key
        line = f"{check}: {name} {old.outcome if old else 'absent'} then, {new.outcome if new else 'absent'} now"
        was, is_ = versions(recorded, check), versions(replayed, check)
        if was != is_:
            # Whatever the result is called: a clean scan and a virus found are two names of one check.
            line += f" ({VERSION_OF.get(check, 'version')} {was} then, {is_} now)"
        elif (old and old.outcome == "fail") or (new and new.outcome == "fail"):
            failed = old if old and old.outcome == "fail" else new
            line += f" (the check failed {'then' if failed is old else 'now'}: {failed.detail or 'no detail'})"
        elif check in DNS_CHECKS:
            line += " (the DNS records it reads are today's, not those of then)"
        elif check == "outbreak":
            line += " (outbreak marks differ: a mark may have been lifted or re-made)"
        elif not any(r.check == check for r in (recorded if old is None else replayed)):
            when = "then" if old is None else "now"
            line += f" (the check did not run {when}: another Bulwark version or setting)"
        else:
            line += " (the check's code or data changed since)"
        causes.append(line)
    return causes


def compare_recorded(recorded: ev.Verdict, replayed: ev.Verdict) -> tuple[bool, list[str]]:
    """(a): is the replayed verdict the recorded one, and if not, why."""
    same = (recorded.action == replayed.action and sorted(recorded.reasons) == sorted(replayed.reasons)
            and recorded.redirect_to == replayed.redirect_to)
    if same:
        return False, []
    causes = result_causes(recorded.results, replayed.results)
    if not causes:
        causes = ["the same results decided otherwise: the verdict logic or a check's default action changed since"]
    return True, causes


def compare_candidate(recorded: ev.Verdict, replayed: ev.Verdict, message, candidate: Policy,
                      recorded_policy: Policy | None) -> tuple[bool, list[str]]:
    """(b): would the action change under the candidate, and why."""
    from streams.verdict import action_for, decide

    if recorded.action == replayed.action and recorded.redirect_to == replayed.redirect_to:
        return False, []
    causes = []
    by_name = {r.name: r for r in replayed.results}
    for name in [n for n in replayed.reasons if n not in recorded.reasons]:
        result = by_name.get(name)
        said = action_for(result, candidate) if result else "quarantine"
        where = "the candidate's actions" if name in candidate.actions else "the check's default"
        causes.append(f"{name} now decides: {said} ({where})")
    for name in [n for n in recorded.reasons if n not in replayed.reasons]:
        result = by_name.get(name)
        if result is None:
            causes.append(f"{name} no longer decides: the check does not report it under the candidate "
                          "(disabled, or its settings changed)")
        elif result.outcome == "pass":
            causes.append(f"{name} no longer decides: the check found nothing this time")
        else:
            causes.append(f"{name} no longer decides: the candidate says {action_for(result, candidate)} for it"
                          + (" (its actions)" if name in candidate.actions else ""))
    for name in [n for n in replayed.reasons if n in recorded.reasons]:
        result = by_name.get(name)
        if result is None or recorded_policy is None:
            continue
        now, then = action_for(result, candidate), action_for(result, recorded_policy)
        if now != then:
            where = "its actions" if name in candidate.actions else "the check's settings"
            causes.append(f"{name}: {now} under the candidate ({where}), {then} under the recorded policy")
    if replayed.action == "redirect" and recorded.action == "redirect" and recorded.redirect_to != replayed.redirect_to:
        causes.append(f"redirected to {replayed.redirect_to} instead of {recorded.redirect_to}")
    if recorded_policy is not None:
        # Would the recorded policy, given today's results, still say what it said? If not, part of the
        # change is not the candidate's doing.
        again = decide(message, replayed.results, recorded_policy)
        if again.action != recorded.action:
            causes.append(f"note: today's results give {again.action} under the recorded policy too; "
                          + "; ".join(result_causes(recorded.results, replayed.results) or ["results differ"]))
    return True, causes or ["the same reasons weigh differently under the candidate"]


async def replay(settings: Settings, verdicts: list[dict], candidate: Policy | None = None, concurrency: int = 8,
                 progress: Callable[[int], None] | None = None, archive: PolicyArchive | None = None,
                 alerts: dict[str, ev.OutbreakDetected] | None = None) -> list[Outcome]:
    """Judge each selected message again; (a) without ``candidate``, (b) with it.

    The policy versions and outbreak marks are read from their topics unless given.
    """
    from streams import outbreak
    from streams.checks import run_checks
    from streams.message import Message
    from streams.verdict import decide

    if archive is None:
        archive = await PolicyArchive.read(settings)
    if alerts is None:
        alerts = {r.event.fingerprint: r.event for r in await read_topics(settings, [OUTBREAK_ALERTS.name])
                  if isinstance(r.event, ev.OutbreakDetected)}
    blobs = BlobStore(settings.blob_dir)
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(data: dict) -> Outcome:
        nonlocal done
        recorded = ev.Verdict.model_validate(data)
        outcome = _outcome(recorded)
        try:
            async with gate:
                recorded_policy = archive.get(recorded.policy_version)
                policy = candidate or recorded_policy
                if policy is None:
                    outcome.error = (f"policy {recorded.policy_version} is neither on {POLICY.name} "
                                     "nor the local policy file")
                    return outcome
                try:
                    raw = await blobs.get(recorded.envelope.sha256)
                except OSError as exc:  # gone, or no longer the message (its digest differs)
                    outcome.error = f"raw message not readable from the blob store: {exc.strerror or exc}"
                    return outcome
                AS_OF.set(recorded.occurred_at)
                message = Message(recorded.message_id, recorded.session_id, recorded.envelope, recorded.direction,
                                  raw, policy)
                replayed = decide(message, await run_checks(message, policy), policy)
                outcome.replayed_action = replayed.action
                outcome.replayed_reasons = list(replayed.reasons)
                outcome.replayed_policy = policy.version
                if candidate is None:
                    outcome.changed, outcome.causes = compare_recorded(recorded, replayed)
                else:
                    outcome.changed, outcome.causes = compare_candidate(recorded, replayed, message, candidate,
                                                                        recorded_policy)
                return outcome
        finally:
            done += 1
            if progress:
                progress(done)

    saved = outbreak.ACTIVE
    outbreak.ACTIVE = MarksAsOf(alerts)
    try:
        # Each message in its own task, so each has its own AS_OF.
        return list(await asyncio.gather(*(asyncio.ensure_future(one(d)) for d in verdicts)))
    finally:
        outbreak.ACTIVE = saved


def table(outcomes: list[Outcome], candidate: bool, show_all: bool = False) -> str:
    """The outcomes that matter to a person (changed ones and those that could not be replayed), or all."""
    rows = [o for o in outcomes if show_all or o.changed or o.error]
    if not rows:
        return ""
    lines = [f"{'judged at':19}  {'message':16}  {'sender':28}  {'client':15}  "
             f"{'recorded':10}  {'candidate' if candidate else 'replayed':10}  why"]
    for o in rows:
        when = datetime.fromisoformat(o.judged_at).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        why = o.error or "; ".join(o.causes) or "same"
        lines.append(f"{when:19}  {o.message_id[:16]:16}  {(o.sender or '<>')[:28]:28}  {o.client_ip[:15]:15}  "
                     f"{o.recorded_action:10}  {(o.replayed_action or '-'):10}  {why}")
    return "\n".join(lines)

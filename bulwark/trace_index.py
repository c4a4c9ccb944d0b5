"""The trace index: where every record about a message, a session, a client or an account is.

``bulwark trace`` used to read every message topic from the beginning on each
call. The trace indexer (``sinks/trace_index.py``) reads those topics once,
as they are written, and keeps, in a RocksDB store and in its changelog (the
compacted ``trace.index`` topic):

- ``m ID``: the (topic, partition, offset) of every record about message ID;
- ``s ID``: the same for every ``smtp.sessions`` record of session ID;
- ``i IP TIME SESSION``: a session from IP that connected at TIME (ms);
- ``a ACCOUNT TIME KIND ID``: an account named at TIME by a session (KIND
  ``s``: it authenticated as, or gave MAIL FROM, the account) or by a
  message (``m``: sender, recipient or authenticated user);
- ``o TOPIC PARTITION``: the next offset the index has not read yet.

(The fields are split by NUL.) A trace then looks a few keys up and fetches
those records by offset; time ranges are ranges of RocksDB's sorted keys. The
records the index has not read yet (its lag, normally a fraction of a second)
are read from the topics directly, so a trace is never missing the newest.

This module is what the indexer and ``bulwark trace`` share: how records
become index entries, the store, and fetching records by their offsets.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import confluent_kafka
import orjson
from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from bulwark.kafka import Record, assigned_reader_config
from bulwark.settings import Settings
from schemas import codec
from schemas.topics import BY_NAME, DELIVERIES, QUARANTINE, RECEIVED, SESSIONS, VERDICTS

log = logging.getLogger(__name__)

#: The topics whose records a trace shows.
INDEXED_TOPICS = [SESSIONS.name, RECEIVED.name, VERDICTS.name, DELIVERIES.name, QUARANTINE.name]

SEP = "\x00"
Location = tuple[str, int, int]


def message_key(message_id: str) -> str:
    return f"m{SEP}{message_id}"


def session_key(session_id: str) -> str:
    return f"s{SEP}{session_id}"


def ip_prefix(ip: str) -> str:
    return f"i{SEP}{ip}{SEP}"


def ip_key(ip: str, timestamp_ms: int, session_id: str) -> str:
    return f"{ip_prefix(ip)}{timestamp_ms:013d}{SEP}{session_id}"


def account_prefix(account: str) -> str:
    return f"a{SEP}{account.lower()}{SEP}"


def account_key(account: str, timestamp_ms: int, kind: str, ident: str) -> str:
    return f"{account_prefix(account)}{timestamp_ms:013d}{SEP}{kind}{SEP}{ident}"


def position_key(topic: str, partition: int) -> str:
    return f"o{SEP}{topic}{SEP}{partition}"


def is_posting(key: str) -> bool:
    """Keys whose value is a list of locations (the others are facts in their key)."""
    return key[0] in "ms"


@dataclass
class Entries:
    """What a batch of records adds to the index."""

    postings: dict[str, set[Location]] = field(default_factory=lambda: defaultdict(set))
    facts: set[str] = field(default_factory=set)
    #: (topic, partition) -> the offset after the last record read
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Records read
    records: int = 0

    def add(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
            headers, timestamp_ms: int) -> None:
        self.positions[(topic, partition)] = offset + 1
        self.records += 1
        try:
            self._add(topic, partition, offset, key, value, headers, timestamp_ms)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not a Bulwark event (or a corrupt one): a trace could not show it anyway.
            log.warning("not indexed: %s[%d]@%d: %s", topic, partition, offset, exc)

    def _add(self, topic, partition, offset, key, value, headers, timestamp_ms) -> None:
        where = (topic, partition, offset)
        if topic != SESSIONS.name and topic != RECEIVED.name:
            # Keyed by message id: nothing needs parsing.
            if key:
                self.postings[message_key(key.decode())].add(where)
            return
        data = orjson.loads(value)
        kind = data["type"]
        if topic == RECEIVED.name:
            message_id = data.get("message_id") or key.decode()
            self.postings[message_key(message_id)].add(where)
            envelope = data.get("envelope") or {}
            # v1 records kept the envelope flat (schemas/codec.py)
            accounts = {envelope.get("mail_from") or data.get("mail_from"), envelope.get("authenticated_user"),
                        *(envelope.get("rcpt_to") or data.get("recipients") or [])}
            for account in accounts - {None, ""}:
                self.facts.add(account_key(account, timestamp_ms, "m", message_id))
            return
        session_id = data.get("session_id")
        if not session_id:
            return
        self.postings[session_key(session_id)].add(where)
        if kind == "session.connected":
            self.facts.add(ip_key(data["client_ip"], timestamp_ms, session_id))
        elif kind == "session.auth" and data.get("username"):
            self.facts.add(account_key(data["username"], timestamp_ms, "s", session_id))
        elif kind == "session.mail" and data.get("sender"):
            self.facts.add(account_key(data["sender"], timestamp_ms, "s", session_id))


def _pack(locations: Iterable[Location]) -> bytes:
    return orjson.dumps(sorted(locations))


def _unpack(raw: bytes | None) -> set[Location]:
    return {tuple(loc) for loc in orjson.loads(raw)} if raw else set()


class IndexStore:
    """The indexer's RocksDB store; ``bulwark trace`` opens it read-only beside the running indexer."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        options = Options(raw_mode=True)
        if read_only:
            self.db = Rdict(str(self.path), options=options, access_type=AccessType.read_only())
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            options.create_if_missing(True)
            # A reader opening the store replays its write-ahead log (what is
            # not yet in a table file): small memtables keep that log, and
            # so the cost of every `bulwark trace`, small.
            options.set_write_buffer_size(4 * 1024 * 1024)
            self.db = Rdict(str(self.path), options=options)
            durable = WriteOptions()
            durable.sync = True  # the offsets written with a batch say it is done
            self.db.set_write_options(durable)

    @classmethod
    def open_read_only(cls, settings: Settings) -> "IndexStore | None":
        path = store_path(settings)
        if not (path / "CURRENT").exists():
            return None
        return cls(path, read_only=True)

    def merged(self, entries: Entries) -> dict[str, bytes]:
        """Every key the batch changes with its new value: postings grow, facts and positions are set."""
        changes: dict[str, bytes] = {}
        for key, locations in entries.postings.items():
            have = _unpack(self.db.get(key.encode()))
            if not locations <= have:
                changes[key] = _pack(have | locations)
        for key in entries.facts:
            if self.db.get(key.encode()) is None:
                changes[key] = b""
        # Last, so that in the changelog a position follows the entries it covers.
        for (topic, partition), offset in entries.positions.items():
            changes[position_key(topic, partition)] = str(offset).encode()
        return changes

    def write(self, changes: dict[str, bytes]) -> None:
        """One synced write: the entries and the positions they reach, together."""
        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            batch.put(key.encode(), value)
        self.db.write(batch)

    def settle(self) -> None:
        """Move what is only in the write-ahead log into a table file (the indexer does it when idle)."""
        self.db.flush(True)

    def locations(self, key: str) -> set[Location]:
        return _unpack(self.db.get(key.encode()))

    def positions(self) -> dict[tuple[str, int], int]:
        found = {}
        for topic in INDEXED_TOPICS:
            for partition in range(BY_NAME[topic].partitions):
                raw = self.db.get(position_key(topic, partition).encode())
                if raw is not None:
                    found[(topic, partition)] = int(raw)
        return found

    def empty(self) -> bool:
        return not self.positions()

    def range(self, prefix: str, since_ms: int | None, until_ms: int | None) -> Iterator[list[str]]:
        """The fields after ``prefix`` of every fact key stamped in [since, until]."""
        start = f"{prefix}{(since_ms or 0):013d}".encode()
        end = f"{prefix}{(until_ms if until_ms is not None else 10 ** 13 - 1):013d}{SEP}\xff".encode()
        for raw in self.db.keys(from_key=start):
            if raw > end or not raw.startswith(prefix.encode()):
                break
            yield raw.decode()[len(prefix):].split(SEP)

    def close(self) -> None:
        self.db.close()


def store_path(settings: Settings) -> Path:
    return settings.data_dir / "trace-index"


def fact_range(facts: Iterable[str], prefix: str, since_ms: int | None, until_ms: int | None) -> Iterator[list[str]]:
    """``IndexStore.range`` over facts held in memory (the records the index has not read yet)."""
    for key in sorted(facts):
        if key.startswith(prefix):
            fields = key[len(prefix):].split(SEP)
            stamp = int(fields[0])
            if (since_ms is None or stamp >= since_ms) and (until_ms is None or stamp <= until_ms):
                yield fields


def reader(settings: Settings, client_id: str = "bulwark-trace") -> confluent_kafka.Consumer:
    """A consumer in no group: it reads where it is told and commits nothing, so it disturbs no one."""
    # A trace waits for each answer: the broker must not hold a fetch back
    # to fill it (its default is up to 500 ms).
    return confluent_kafka.Consumer(assigned_reader_config(settings, client_id, **{"fetch.wait.max.ms": 5}))


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Each partition's end (of committed records), in one request to the broker.

    ``offsets_for_times`` with the "latest" timestamp, not an AdminClient:
    destroying one here sometimes waited a second for its background thread.
    """
    consumer = reader(settings, "bulwark-trace-ends")
    try:
        found = consumer.offsets_for_times(
            [confluent_kafka.TopicPartition(t, p, confluent_kafka.OFFSET_END)
             for t in topics for p in range(BY_NAME[t].partitions)], timeout=30)
        return {(tp.topic, tp.partition): tp.offset for tp in found}
    finally:
        consumer.close()


def read_tail(settings: Settings, starts: dict[tuple[str, int], int], timeout: float = 120) -> Entries:
    """Index, in memory, every record from ``starts`` (the index's positions; 0 when absent) to the end.

    The ends are asked for first, in one request: for an index that has
    caught up, that is all a trace costs beyond its own records.
    """
    entries = Entries()
    ends = {where: end for where, end in end_offsets(settings, INDEXED_TOPICS).items() if starts.get(where, 0) < end}
    if not ends:
        return entries
    consumer = reader(settings, "bulwark-trace-tail")
    try:
        consumer.assign([confluent_kafka.TopicPartition(t, p, starts.get((t, p), confluent_kafka.OFFSET_BEGINNING))
                         for t, p in ends])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=0.05):
                where = (msg.topic(), msg.partition())
                if msg.error() is not None:
                    if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        ends.pop(where, None)
                    continue
                if where not in ends:
                    continue
                if msg.offset() < ends[where]:
                    entries.add(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers(),
                                msg.timestamp()[1])
                if msg.offset() + 1 >= ends[where]:
                    ends.pop(where)
        if ends:
            raise TimeoutError(f"could not read {len(ends)} partition(s) to their end in {timeout:g}s")
        return entries
    finally:
        consumer.close()


class Fetcher:
    """Fetches records by their offsets: one seek per record, whatever the topics hold."""

    def __init__(self, settings: Settings):
        self.consumer = reader(settings, "bulwark-trace-fetch")

    def fetch(self, locations: Iterable[Location], timeout: float = 30) -> list[Record]:
        pending: dict[tuple[str, int], list[int]] = defaultdict(list)
        for topic, partition, offset in set(locations):
            pending[(topic, partition)].append(offset)
        if not pending:
            return []
        for offsets in pending.values():
            offsets.sort(reverse=True)  # the next one wanted is last
        records: list[Record] = []
        consumer = self.consumer
        assigned = [confluent_kafka.TopicPartition(t, p, offsets[-1]) for (t, p), offsets in pending.items()]
        consumer.assign(assigned)
        consumer.resume(assigned)  # paused by an earlier fetch
        try:
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(num_messages=500, timeout=0.05):
                    where = (msg.topic(), msg.partition())
                    offsets = pending.get(where)
                    if offsets is None:
                        continue
                    if msg.error() is not None:
                        if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                            log.warning("%s[%d]: offsets %s are past the end", *where, offsets)
                            self._done(pending, where)
                        continue
                    while offsets and offsets[-1] < msg.offset():
                        # Gone (retention) or an aborted transaction's record: nothing to show.
                        offsets.pop()
                    if offsets and offsets[-1] == msg.offset():
                        offsets.pop()
                        try:
                            event = codec.decode(msg.value(), msg.headers())
                        except ValueError as exc:
                            log.warning("skipping %s[%d]@%d: %s", *where, msg.offset(), exc)
                        else:
                            records.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), event))
                    if not offsets:
                        self._done(pending, where)
                    elif offsets[-1] > msg.offset() + 1:
                        consumer.seek(confluent_kafka.TopicPartition(*where, offsets[-1]))
            if pending:
                raise TimeoutError(f"could not fetch {sum(map(len, pending.values()))} record(s) in {timeout:g}s")
            return records
        finally:
            consumer.unassign()

    def _done(self, pending: dict, where: tuple[str, int]) -> None:
        pending.pop(where, None)
        self.consumer.pause([confluent_kafka.TopicPartition(*where)])

    def close(self) -> None:
        self.consumer.close()

"""Table updates that count each source record once, however often Kafka delivers it.

Why this exists. Faust 0.15.3's ``processing_guarantee="exactly_once"`` does
not hold when partitions move between workers. Measured here (two workers,
the second joining under traffic, twenty client addresses): eight of the
twenty screening counters ended wrong, some doubled and some short. Reading
Faust's code gives two causes. It commits a transaction's offsets without
first flushing the producer buffer that holds the table's changelog writes
(transport/consumer.py, ``_commit_offsets``, the ``in_transaction`` branch).
And at revocation it stops the revoked partitions' transactional producers
without committing them. A changelog write can therefore miss the
transaction of the offset it belongs to, and be lost when a later one is
aborted.

So the workers run Faust's ``at_least_once``. Before committing an offset
Faust flushes the producer (the other branch of the same method), so every
table change a committed record made is in the changelog. A record can still
be delivered twice: after a crash, or when a partition moves before its
offset was committed. Every update that counts is made idempotent here.
A window's value remembers, for each source partition, the offset of the
last record applied to it, and a record at or below that offset changes
nothing. The records of one key come from one source partition, in offset
order, so this mark is all it takes. That is exactly-once in effect, and it
has to be judged per window: after a crash some of a record's windows may
have reached the changelog and others not.

A record forwarded to a repartition topic carries its origin in the
``bulwark-source`` header. It is deduplicated by where it came from, not
where it was forwarded to: a re-forwarded duplicate lands at a new offset of
the repartition topic but keeps its origin.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

log = logging.getLogger(__name__)

#: Reserved key in a window's value: {source partition: last offset applied}.
APPLIED = "_applied"
#: Header naming a forwarded record's origin, "topic/partition/offset".
SOURCE_HEADER = "bulwark-source"


@dataclass(frozen=True)
class Source:
    """Where a record came from: a topic partition and an offset in it."""

    partition: str  # "topic/partition"
    offset: int

    def header(self) -> tuple[str, bytes]:
        return SOURCE_HEADER, f"{self.partition}/{self.offset}".encode()


def source_of(record) -> Source:
    """The origin of a Faust event: its ``bulwark-source`` header, else its own position."""
    headers = record.headers
    items = headers.items() if hasattr(headers, "items") else (headers or [])
    for name, value in items:
        if name == SOURCE_HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            partition, _, offset = text.rpartition("/")
            if partition and offset.isdigit():
                return Source(partition, int(offset))
            # Not written by Bulwark: the record's own position still counts it once.
            log.warning("ignoring a malformed %s header: %r", SOURCE_HEADER, text[:80])
    message = record.message
    return Source(f"{message.topic}/{message.partition}", message.offset)


def applied(value: dict | None, source: Source) -> bool:
    """Whether this window's value already holds the record at ``source``."""
    return (value or {}).get(APPLIED, {}).get(source.partition, -1) >= source.offset


def once(op: Callable[[dict | None, object], dict], source: Source) -> Callable[[dict | None, object], dict]:
    """``op`` as a window operation that applies the record at ``source`` once.

    ``op(old, argument)`` returns the new value; the mark is kept in it under
    ``APPLIED``.
    """

    def apply(old: dict | None, argument: object) -> dict:
        if applied(old, source):
            return old  # type: ignore[return-value]
        new = op(old, argument)
        new[APPLIED] = {**(old or {}).get(APPLIED, {}), source.partition: source.offset}
        return new

    return apply


def count_once(windows, op: Callable[[dict | None, object], dict], argument: object, source: Source,
               back: float) -> dict | None:
    """Count the record at ``source`` into every window of its time, once.

    ``windows`` is a Faust window wrapper (``table[key]``); ``back`` picks
    the window the decision reads, ``back`` seconds before the record (the
    last M minutes). Returns that window's value, or None when it already
    held this record: counted, and decided on, before this delivery.
    """
    if applied(windows.delta(back), source):
        return None
    windows.apply(once(op, source), argument)
    return windows.delta(back)


def cleared(old: dict | None, _argument: object = None) -> dict:
    """Window operation: start again from zero, keeping the marks.

    Kept so that a record counted before the reset and delivered again
    after it is still recognised.
    """
    return {APPLIED: dict((old or {}).get(APPLIED, {}))}


def event_id(occurred_at: datetime, source: Source, what: str) -> str:
    """A deterministic event id for a fact decided while processing ``source``.

    Same shape as ``schemas.events.new_id`` (milliseconds, then 64 bits), so
    ids still sort by time; the 64 bits are a hash of the origin instead of
    random. A fact published twice (a crash between publishing it and
    committing its record) is the same event twice, and a replay of the topic
    issues it with the same id.
    """
    digest = hashlib.sha256(f"{source.partition}/{source.offset}/{what}".encode()).hexdigest()[:16]
    return f"{int(occurred_at.timestamp() * 1000):012x}{digest}"

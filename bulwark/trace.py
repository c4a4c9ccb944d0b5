"""``bulwark trace``: the whole timeline of a message or a session, from Kafka alone.

Message topics are keyed by message id, so a message's records are found by
key; its session's records are on ``smtp.sessions`` under the client's IP.
A DSN that a bounce produced is followed too.

Where the trace indexer runs (``bulwark sinks trace-index``), a trace looks
the ids up in its index (``bulwark/trace_index.py``) and fetches only those
records by offset, plus whatever the index has not read yet: well under a
second among millions of records. Without an index it reads the topics from
the beginning (``scan_trace``), as it always did, and says so. A client
address or an account over a time range can only be traced with the index
(or by reading everything into one in memory, which is what happens without).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, RECEIVED, SESSIONS, VERDICTS

from bulwark import trace_index as ix
from bulwark.kafka import Record, read_topics
from bulwark.settings import Settings

MESSAGE_TOPICS = [RECEIVED.name, VERDICTS.name, DELIVERIES.name, QUARANTINE.name]
_ORDER = {name: i for i, name in enumerate([SESSIONS.name, *MESSAGE_TOPICS])}


def in_order(records: Iterable[Record]) -> list[Record]:
    unique = {(r.topic, r.partition, r.offset): r for r in records}
    return sorted(unique.values(), key=lambda r: (r.event.occurred_at, _ORDER[r.topic], r.offset))


async def _message_records(settings: Settings, message_ids: set[str]) -> list[Record]:
    records: list[Record] = []
    pending = set(message_ids)
    seen: set[str] = set()
    while pending:
        found = await read_topics(settings, MESSAGE_TOPICS, keys={m.encode() for m in pending})
        records += found
        seen |= pending
        pending = {
            r.event.dsn_message_id
            for r in found
            if isinstance(r.event, ev.DeliveryBounced) and r.event.dsn_message_id
        } - seen
    return records


async def scan_trace(settings: Settings, ident: str) -> list[Record]:
    """Records about a message id or a session id, in the order they happened, read from the beginning."""
    records = await _message_records(settings, {ident})
    if records:
        sessions = {(r.event.session_id, r.event.envelope.client_ip) for r in records
                    if isinstance(r.event, ev.MessageReceived)}
        for session_id, client_ip in sessions:
            session_records = await read_topics(settings, [SESSIONS.name], keys={client_ip.encode()})
            records += [r for r in session_records if r.event.session_id == session_id]
    else:
        session_records = [r for r in await read_topics(settings, [SESSIONS.name]) if r.event.session_id == ident]
        records = session_records
        message_ids = {r.event.message_id for r in session_records
                       if isinstance(r.event, ev.SessionData) and r.event.accepted and r.event.message_id}
        if message_ids:
            records += await _message_records(settings, message_ids)
    return in_order(records)


class Index:
    """The trace index as of now: the indexer's store, and the records it has not read yet.

    ``Index.open`` reads that tail from the topics (everything, when there is
    no store: then ``scanned`` is true and the caller says so).
    """

    def __init__(self, settings: Settings, store: ix.IndexStore | None, tail: ix.Entries):
        self.settings = settings
        self.store = store
        self.tail = tail

    def fetch(self, locations) -> list[Record]:
        # A consumer per fetch: one reassigned to other partitions sometimes
        # waited a second before its first fetch; a new one takes ~20 ms.
        fetcher = ix.Fetcher(self.settings)
        try:
            return fetcher.fetch(locations)
        finally:
            fetcher.close()

    @classmethod
    def open(cls, settings: Settings, scan_without_store: bool = True) -> "Index | None":
        store = ix.IndexStore.open_read_only(settings)
        if store is not None and store.empty():
            store.close()
            store = None
        if store is None and not scan_without_store:
            return None
        # Without a store the "tail" is every record: as long as a scan takes.
        tail = ix.read_tail(settings, store.positions() if store else {}, timeout=120 if store else 24 * 3600)
        return cls(settings, store, tail)

    @property
    def scanned(self) -> bool:
        return self.store is None

    @property
    def lag(self) -> int:
        """Records the indexer had not read when the trace began."""
        return self.tail.records if self.store else 0

    def locations(self, key: str) -> set[ix.Location]:
        have = self.store.locations(key) if self.store else set()
        return have | self.tail.postings.get(key, set())

    def range(self, prefix: str, since: datetime | None, until: datetime | None) -> list[list[str]]:
        since_ms = int(since.timestamp() * 1000) if since else None
        until_ms = int(until.timestamp() * 1000) if until else None
        found = list(self.store.range(prefix, since_ms, until_ms)) if self.store else []
        found += ix.fact_range(self.tail.facts, prefix, since_ms, until_ms)
        return sorted({tuple(f): f for f in found}.values())

    def close(self) -> None:
        if self.store:
            self.store.close()


    # -- traces -------------------------------------------------------------------

    def _messages(self, message_ids: set[str]) -> list[Record]:
        records: list[Record] = []
        pending, seen = set(message_ids), set()
        while pending:
            found = self.fetch([loc for m in pending for loc in self.locations(ix.message_key(m))])
            records += found
            seen |= pending
            pending = {r.event.dsn_message_id for r in found
                       if isinstance(r.event, ev.DeliveryBounced) and r.event.dsn_message_id} - seen
        return records

    def trace(self, ident: str) -> list[Record]:
        """What ``scan_trace`` finds, from the index: a message id or a session id."""
        if self.locations(ix.message_key(ident)):
            records = self._messages({ident})
            sessions = {r.event.session_id for r in records if isinstance(r.event, ev.MessageReceived)}
            records += self.fetch([loc for s in sessions if s for loc in self.locations(ix.session_key(s))])
        else:
            records = self.fetch(self.locations(ix.session_key(ident)))
            message_ids = {r.event.message_id for r in records
                           if isinstance(r.event, ev.SessionData) and r.event.accepted and r.event.message_id}
            records += self._messages(message_ids)
        return in_order(records)

    def sessions_from(self, ip: str, since: datetime | None, until: datetime | None) -> list[Timeline]:
        """Every session the client at ``ip`` opened in [since, until], each with its messages."""
        return [Timeline(f"session {sid} from {ip}", self.trace(sid))
                for _stamp, sid in self.range(ix.ip_prefix(ip), since, until)]

    def account(self, account: str, since: datetime | None, until: datetime | None) -> list[Timeline]:
        """Every session that authenticated as or sent from ``account``, and every message it sent or got."""
        timelines: list[Timeline] = []
        covered: set[str] = set()
        for _stamp, kind, ident in self.range(ix.account_prefix(account), since, until):
            if ident in covered:
                continue
            records = self.trace(ident)
            covered |= {r.event.message_id for r in records if r.event.message_id}
            covered |= {r.event.session_id for r in records if r.event.session_id}
            covered.add(ident)
            timelines.append(Timeline(f"{'message' if kind == 'm' else 'session'} {ident}", records))
        return timelines


@dataclass
class Timeline:
    title: str
    records: list[Record]


async def trace(settings: Settings, ident: str) -> tuple[list[Record], Index | None]:
    """Records about a message id or a session id, through the index where there is one.

    Returns the records and the index used (None: the topics were scanned).
    """
    index = await asyncio.to_thread(Index.open, settings, False)
    if index is None:
        return await scan_trace(settings, ident), None
    try:
        return await asyncio.to_thread(index.trace, ident), index
    finally:
        index.close()


def _why(reason: str | None) -> str:
    # Releases and deletions recorded before they kept a reason have none.
    return f" ({reason})" if reason else " (no reason recorded)"


def describe(event: ev.Event) -> str:
    """One line an administrator can read."""
    match event:
        case ev.SessionConnected():
            return f"connect from {event.client_ip}:{event.client_port} on {event.listener} (port {event.server_port})"
        case ev.SessionRefused():
            return f"refused at {event.phase} with {event.reply_code} ({event.reason})"
        case ev.SessionEhlo():
            return f"{'EHLO' if event.esmtp else 'HELO'} {event.hostname}"
        case ev.SessionStartTls():
            return f"STARTTLS {event.outcome} {event.tls_version or ''}".rstrip()
        case ev.SessionAuth():
            return f"AUTH {event.mechanism} {event.username or ''} {event.outcome} {event.reason or ''}".rstrip()
        case ev.SessionMail():
            why = f" ({event.reason})" if event.reason else ""
            return f"MAIL FROM:<{event.sender}> -> {event.reply_code}{why}"
        case ev.SessionRcpt():
            why = f" ({event.reason})" if event.reason else ""
            v = event.verification
            checked = (f" [{v.result} by {v.source or 'no source'}{', cached' if v.cached else ''}, "
                       f"{v.latency_ms:.0f} ms]") if v else ""
            return f"RCPT TO:<{event.recipient}> -> {event.reply_code}{why}{checked}"
        case ev.SessionRset():
            return "RSET"
        case ev.SessionData():
            why = f" ({event.reason})" if event.reason else ""
            return f"DATA {event.size} bytes -> {event.reply_code}{why}"
        case ev.SessionDisconnected():
            return f"disconnect after {event.duration_seconds:.3f}s, {event.messages_accepted} message(s) accepted"
        case ev.MessageReceived():
            e = event.envelope
            return f"received {e.size} bytes from <{e.mail_from}> to {', '.join(e.rcpt_to)} ({event.direction}) sha256 {e.sha256[:12]}"
        case ev.Verdict():
            hits = [f"{r.name}" for r in event.results if r.outcome != "pass"]
            return (f"verdict {event.action}" + (f" because {', '.join(event.reasons)}" if event.reasons else "")
                    + f" [policy {event.policy_version}; results: {', '.join(hits) or 'all clean'}]")
        case ev.MessageRefused():
            return f"refused with {event.reply_code} at the end of DATA because {', '.join(event.reasons)}"
        case ev.DeliveryQueued():
            return f"queued for delivery ({event.source}) to {', '.join(event.recipients)}"
        case ev.DeliveryAttempted():
            parts = [f"{r.recipient} {r.outcome} {r.reply_code or ''}".rstrip() for r in event.recipients]
            t = event.tls
            over = (f" over {t.version} ({t.policy}{', verified' if t.verified else ''})" if t and t.version
                    else f" in cleartext ({t.policy})" if t else "")
            return f"attempt {event.attempt} to {event.server}{over}: {'; '.join(parts)}"
        case ev.DeliveryBounced():
            dsn = f", DSN {event.dsn_message_id}" if event.dsn_message_id else ", no DSN (null sender)"
            return f"bounced {', '.join(r.recipient for r in event.recipients)}{dsn}"
        case ev.QuarantineAdded():
            return f"quarantined because {', '.join(event.reasons)}"
        case ev.QuarantineReleased():
            to = f" to {', '.join(event.to)} instead" if event.to else ""
            return f"released from quarantine by {event.by}{to}{_why(event.reason)}"
        case ev.QuarantineDeleted():
            return f"deleted from quarantine by {event.by}{_why(event.reason)}"
    return event.TYPE

"""Message tracking for the console: find messages, then show one's timeline.

The search reads ``mail.received`` (what was accepted) and ``mail.verdicts``
(what became of it) from Kafka, only from the start of the time range asked
for: each partition is entered at its first record stamped at or after it
(records carry their event's time), so a day's search reads a day, not the
topics' whole history. The timeline is ``bulwark trace``'s
(:func:`bulwark.trace.trace` and its one-line descriptions), so the console
and the command line tell one story.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from aiohttp import web

from console.web import ConsoleBase, Refused
from schemas import events as ev
from schemas.topics import RECEIVED, VERDICTS

#: At most this many rows are shown; the page says how many more matched.
LIMIT = 500
#: The range searched when none is given.
DEFAULT_HOURS = 24
#: A datetime-local field sends "YYYY-MM-DDTHH:MM" (seconds optional); a date alone is a day.
WHEN = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?)?$")

ReadRecords = Callable[[list[str], datetime], Awaitable[list]]
TraceRecords = Callable[[str], Awaitable[list]]


@dataclass(frozen=True)
class Query:
    message_id: str = ""
    sender: str = ""
    recipient: str = ""
    client_ip: str = ""
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_form(cls, form, now: datetime) -> tuple["Query", dict[str, str]]:
        """The query a search form asks for, and the form's values to show again.

        Times are UTC. No start means the last DEFAULT_HOURS hours; a time that
        is not one is ignored (the page shows the range actually searched).
        """
        values = {k: str(form.get(k, "")).strip()[:256]
                  for k in ("message_id", "sender", "recipient", "client_ip", "since", "until")}
        since, until = _when(values["since"]), _when(values["until"], end=True)
        if since is None:
            since = (until or now) - timedelta(hours=DEFAULT_HOURS)
        values["since"] = since.strftime("%Y-%m-%dT%H:%M")
        values["until"] = until.strftime("%Y-%m-%dT%H:%M") if until else ""
        return cls(values["message_id"], values["sender"], values["recipient"], values["client_ip"],
                   since, until), values


def _when(value: str, end: bool = False) -> datetime | None:
    if not WHEN.match(value):
        return None
    try:
        when = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
    except ValueError:  # 2026-02-30
        return None
    if end and "T" not in value:
        when += timedelta(days=1)  # "until a day" includes that day
    return when


def rows(records: list) -> list[dict]:
    """One row per received message, with what became of it, newest first."""
    found: dict[str, dict] = {}
    outcomes: dict[str, dict] = {}
    for record in records:
        event = record.event
        if isinstance(event, ev.MessageReceived):
            e = event.envelope
            found[event.message_id] = {
                "message_id": event.message_id, "received_at": event.occurred_at, "sender": e.mail_from,
                "recipients": list(e.rcpt_to), "client_ip": e.client_ip, "size": e.size,
                "direction": event.direction, "header_message_id": event.header_message_id or "",
                "action": "pending", "reasons": [],
            }
        elif isinstance(event, ev.Verdict):
            outcomes.setdefault(event.message_id, {}).update(action=event.action, reasons=list(event.reasons))
        elif isinstance(event, ev.MessageRefused):
            # The client was answered 550 in time: that, not the verdict's action, is what happened.
            outcomes.setdefault(event.message_id, {})["refused"] = event.reply_code
    for message_id, row in found.items():
        outcome = outcomes.get(message_id, {})
        row.update({k: v for k, v in outcome.items() if k in ("action", "reasons")})
        if "refused" in outcome:
            row["action"] = f"refused ({outcome['refused']})"
    return sorted(found.values(), key=lambda r: r["received_at"], reverse=True)


def matches(row: dict, q: Query) -> bool:
    """Case-insensitive parts of each field; the message id is the gateway's or the Message-ID header."""
    if q.since and row["received_at"] < q.since:
        return False
    if q.until and row["received_at"] >= q.until:
        return False
    if q.message_id:
        wanted = q.message_id.lower().strip("<>")
        if wanted not in row["message_id"].lower() and wanted not in row["header_message_id"].lower():
            return False
    if q.sender and q.sender.lower() not in row["sender"].lower():
        return False
    if q.recipient and not any(q.recipient.lower() in r.lower() for r in row["recipients"]):
        return False
    if q.client_ip and q.client_ip != row["client_ip"]:
        return False
    return True


class Tracking:
    """Search and timelines, over whatever reads the topics (Kafka in the console)."""

    def __init__(self, read: ReadRecords, trace: TraceRecords):
        self._read = read
        self._trace = trace

    async def search(self, q: Query) -> tuple[list[dict], int]:
        """(the rows to show, how many more matched)."""
        records = await self._read([RECEIVED.name, VERDICTS.name], q.since)
        found = [row for row in rows(records) if matches(row, q)]
        return found[:LIMIT], max(0, len(found) - LIMIT)

    async def timeline(self, ident: str) -> list[dict]:
        from bulwark.trace import describe

        return [{"at": r.event.occurred_at, "topic": r.topic, "type": r.event.TYPE, "what": describe(r.event)}
                for r in await self._trace(ident)]


def kafka_tracking(settings) -> Tracking:
    """The console's: reads the topics without a consumer group, as ``bulwark trace`` does."""
    from bulwark.kafka import iter_records
    from bulwark.trace import trace

    types = {ev.MessageReceived.TYPE, ev.Verdict.TYPE, ev.MessageRefused.TYPE}

    async def read(topics: list[str], since: datetime) -> list:
        return [r async for r in iter_records(settings, topics, since=since, types=types)]

    async def timeline(ident: str) -> list:
        records, _index = await trace(settings, ident)  # through the trace index, or a scan without one
        return records

    return Tracking(read, timeline)


class TrackingPages(ConsoleBase):
    """Search (admin and help desk) and a message's timeline."""

    async def tracking_search(self, request: web.Request) -> web.Response:
        self.require(request, "admin", "helpdesk")
        q, values = Query.from_form(request.query, datetime.now(timezone.utc))
        searched = any(request.query.get(k) for k in ("message_id", "sender", "recipient", "client_ip",
                                                       "since", "until"))
        found, more = (await self.tracking.search(q)) if searched else ([], 0)
        return self.render("tracking.html", request, {"q": values, "rows": found, "more": more,
                                                      "searched": searched})

    async def tracking_trace(self, request: web.Request) -> web.Response:
        self.require(request, "admin", "helpdesk")
        ident = request.match_info["ident"]
        timeline = await self.tracking.timeline(ident)
        if not timeline:
            raise Refused(404, "Nothing on the topics about this message or session.")
        return self.render("trace.html", request, {"ident": ident, "timeline": timeline})

"""The first verdict for a message is the one every sink acts on.

The content stage publishes one verdict per message, and remembers that it
did; a crash between the two can make it judge the message again when the
record is redelivered, and the second judgement may differ (a newer
signature database, a DNS answer that changed, an outbreak marked in
between). Two verdicts for one message must never mean "delivered and
quarantined".

Verdicts are keyed by message id, so every consumer of ``mail.verdicts``
reads a message's verdicts in the same order. Each sink keeps the first
verdict's id per message here (on disk before it acts: an fsync it shares
with its other writes, sinks/store.py) and ignores a
later one with a different id, logging it: the delivery sink and the
quarantine sink then always act on the same verdict. The same verdict read
again (a redelivery) is let through; the sinks handle it idempotently.
Entries are forgotten after the delivery retention, like the delivery
queue's finished entries.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from schemas import events as ev
from schemas.events import utcnow
from sinks.store import JsonIndex

log = logging.getLogger(__name__)


class FirstVerdicts:
    def __init__(self, index: JsonIndex, retention: timedelta):
        self.index = index
        self.retention = retention

    async def admit(self, events: list[ev.Event]) -> list[ev.Event]:
        """``events`` without any verdict that is not its message's first (once those are on disk)."""
        first: dict[str, dict] = {}
        admitted: list[ev.Event] = []
        for event in events:
            if not isinstance(event, ev.Verdict):
                admitted.append(event)
                continue
            seen = first.get(event.message_id) or self.index.get(event.message_id)
            if seen is None:
                first[event.message_id] = {"event_id": event.event_id, "action": event.action,
                                           "at": event.occurred_at.isoformat()}
                admitted.append(event)
            elif seen["event_id"] == event.event_id:
                admitted.append(event)  # the same verdict, delivered again
            else:
                log.warning("a second verdict for %s (%s) is ignored: the first (%s, %s) stands",
                            event.message_id, event.action, seen["action"], seen["event_id"])
        self.index.put_many(first, synced=False)
        await self.index.sync()
        return admitted

    def prune(self) -> int:
        cutoff = utcnow() - self.retention
        old = [key for key, seen in self.index.items() if datetime.fromisoformat(seen["at"]) < cutoff]
        self.index.delete_many(old)
        return len(old)

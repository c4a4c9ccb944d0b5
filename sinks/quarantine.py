"""The quarantine sink: holds what the verdicts say to hold, for an administrator.

It records each quarantined message once in its index (RocksDB; the body
stays in the blob store) and announces it on ``quarantine.events``. Releases
and deletions are events on the same topic, published by ``bulwark
quarantine release|delete``; the delivery sink delivers released messages,
and this sink marks them in its index.

A verdict of ``reject`` that arrives after the client was already answered
250 cannot be refused any more; it is quarantined, so nothing accepted is
ever dropped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

from bulwark import metrics
from bulwark.kafka import EventPublisher, consume, start_publisher
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from schemas import events as ev
from schemas.events import utcnow
from schemas.topics import QUARANTINE, VERDICTS
from sinks.first_verdict import FirstVerdicts
from sinks.store import JsonIndex

log = logging.getLogger(__name__)

HOLD_ACTIONS = {"quarantine", "reject"}


def index_path(settings: Settings) -> Path:
    return settings.data_dir / "quarantine" / "index"


#: How often the first-verdict index forgets entries past the retention.
PRUNE_EVERY_SECONDS = 3600


class QuarantineSink:
    def __init__(self, publisher: EventPublisher, index: JsonIndex, first_verdicts: FirstVerdicts | None = None):
        self.publisher = publisher
        self.index = index
        #: The first verdict per message (sinks/first_verdict.py); None: every verdict counts.
        self.first_verdicts = first_verdicts

    async def take(self, events: list[ev.Event]) -> None:
        if self.first_verdicts is not None:
            events = await self.first_verdicts.admit(events)
        for event in events:
            if isinstance(event, ev.Verdict) and event.action in HOLD_ACTIONS:
                await self._hold(event)
            elif isinstance(event, (ev.QuarantineReleased, ev.QuarantineDeleted, ev.MessageRefused)):
                self._mark(event)

    async def _hold(self, verdict: ev.Verdict) -> None:
        record = self.index.get(verdict.message_id)
        if record is None:
            record = {
                "message_id": verdict.message_id,
                "session_id": verdict.session_id,
                "state": "quarantined",
                "envelope": verdict.envelope.model_dump(mode="json"),
                "direction": verdict.direction,
                "action": verdict.action,
                "reasons": verdict.reasons,
                "results": [r.model_dump(mode="json") for r in verdict.results if r.outcome != "pass"],
                "policy_version": verdict.policy_version,
                "quarantined_at": utcnow().isoformat(),
                "announced": False,
            }
            self.index.put(verdict.message_id, record)
            metrics.MESSAGES.labels(action="quarantined").inc()
        if not record["announced"]:
            await self.publisher.publish(
                ev.QuarantineAdded(
                    message_id=verdict.message_id,
                    session_id=verdict.session_id,
                    envelope=verdict.envelope,
                    reasons=verdict.reasons,
                    policy_version=verdict.policy_version,
                )
            )
            record["announced"] = True
            self.index.put(verdict.message_id, record)
            log.info("quarantined %s (%s)", verdict.message_id, ", ".join(verdict.reasons))

    def _mark(self, event: ev.QuarantineReleased | ev.QuarantineDeleted) -> None:
        record = self.index.get(event.message_id)
        if record is None:
            log.warning("%s for %s, which this quarantine does not hold", event.TYPE, event.message_id)
            return
        if isinstance(event, ev.MessageRefused):
            # Refused inline with a 550: the sender still has it; the copy here
            # is for forensics and can never be released.
            record["state"] = "refused"
            record["by"] = "ingest (550 at end of DATA)"
        else:
            state = "released" if isinstance(event, ev.QuarantineReleased) else "deleted"
            if record["state"] != state:  # not a record read again
                metrics.MESSAGES.labels(action=state).inc()
            record["state"] = state
            record["by"] = event.by
            # Why (None for a release or deletion recorded before reasons were kept).
            record["reason"] = event.reason
            if isinstance(event, ev.QuarantineReleased) and event.to:
                record["released_to"] = event.to
        record["updated_at"] = event.occurred_at.isoformat()
        self.index.put(event.message_id, record)


async def serve(settings: Settings) -> None:
    configure_logging("quarantine")
    index = JsonIndex(index_path(settings))
    publisher = await start_publisher(settings, "bulwark-quarantine")
    first = JsonIndex(settings.data_dir / "quarantine" / "first-verdicts")
    sink = QuarantineSink(publisher, index, FirstVerdicts(first, timedelta(days=settings.delivery_retention_days)))
    metrics.EVENT_BACKLOG.set_function(lambda: publisher.backlog)
    metrics_server = metrics.start("quarantine", settings)

    async def prune_hourly() -> None:
        while True:
            await asyncio.to_thread(sink.first_verdicts.prune)
            await asyncio.sleep(PRUNE_EVERY_SECONDS)

    try:
        await run_until_signalled(consume(settings, "bulwark-quarantine", [VERDICTS.name, QUARANTINE.name], sink.take,
                                          batched=True),
                                  prune_hourly())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await publisher.stop()
        index.close()
        first.close()

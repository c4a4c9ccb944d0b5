"""The DMARC reports sink: reads the aggregate reports other organisations send about the local domains.

Mail to one of the policy's ``dmarc_reports.addresses`` (the ``rua`` of the
local domains' DMARC records) travels like any other: ingest, the checks,
a verdict, delivery. This sink follows ``mail.verdicts`` with a consumer
group of its own and, for each message delivered to a report address (and
each one released from the quarantine), reads it from the blob store and
publishes on ``dmarc.reports`` one ``dmarc.report_received`` per report in
it, or a ``dmarc.report_unreadable`` with the reason (sinks/dmarc_aggregate.py
reads them). It only reads and reports: the message is delivered by the
delivery sink whatever happens here.

A process of its own, not a task of the delivery sink, because it inflates
and parses what strangers send: a parser that misbehaves (memory, time)
must never hold up delivery (Postfix's rule: the part that touches
untrusted content runs apart, with nothing else to lose).

Idempotent on message id: a redelivered verdict is not read twice (its
index in ``$BULWARK_DATA_DIR/dmarc-reports/``). A reporter that sends the
same report twice gives two events with one key; ``bulwark dmarc report``
counts it once.
"""

from __future__ import annotations

import asyncio
import logging

from bulwark import metrics
from bulwark.blobstore import BlobStore
from bulwark.kafka import EventPublisher, consume, start_publisher
from bulwark.policy import Policy
from bulwark.policy.runtime import PolicyHolder
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from schemas import events as ev
from schemas.events import utcnow
from schemas.topics import QUARANTINE, VERDICTS
from sinks.dmarc_aggregate import MAX_VALUE, Report, Unreadable, from_address, read_reports, split_rows
from sinks.store import JsonIndex

log = logging.getLogger(__name__)

GROUP = "bulwark-dmarc-reports"


class DmarcReportSink:
    def __init__(self, settings: Settings, policy: Policy | PolicyHolder, publisher: EventPublisher,
                 handled: JsonIndex):
        self.policy = PolicyHolder.of(policy)
        self.publisher = publisher
        self.handled = handled
        self.blobs = BlobStore(settings.blob_dir)

    async def take(self, events: list[ev.Event]) -> None:
        for event in events:
            # "tag" is a deliver with tags; a redirect goes elsewhere, and a
            # held message is read if and when it is released.
            if isinstance(event, ev.Verdict) and event.action == "deliver":
                dmarc = next((r.name for r in event.results if r.check == "dmarc"), None)
                await self.read(event, event.envelope, dmarc)
            elif isinstance(event, ev.QuarantineReleased):
                await self.read(event, event.envelope, None)

    def is_for_reports(self, envelope: ev.Envelope) -> bool:
        settings = self.policy.current.dmarc_reports
        return any(settings.is_report_address(rcpt) for rcpt in envelope.rcpt_to)

    async def read(self, event: ev.Event, envelope: ev.Envelope, dmarc: str | None) -> list[ev.Event]:
        """Publish what the message's reports say; return the events (none when not for reports or done)."""
        if not self.is_for_reports(envelope) or event.message_id in self.handled:
            return []
        limit = self.policy.current.dmarc_reports.max_report_bytes
        try:
            raw = await self.blobs.get(envelope.sha256)
        except OSError as exc:
            found = [Unreadable(0, f"the message is not in the blob store: {exc}", None, None, None)]
            raw = b""
        else:
            # Inflating and parsing is CPU work: off the event loop.
            found = await asyncio.to_thread(read_reports, raw, limit)
        events = to_events(event, envelope, dmarc, from_address(raw) if raw else None, found)
        for out in events:
            await self.publisher.publish(out)
            metrics.DMARC_REPORTS.labels(
                outcome="unreadable" if isinstance(out, ev.DmarcReportUnreadable) else "received").inc()
            if isinstance(out, ev.DmarcReportUnreadable):
                log.warning("unreadable DMARC report in %s from <%s>: %s", event.message_id, envelope.mail_from,
                            out.error)
            else:
                log.info("DMARC report %s from %s about %s: %d rows (part %d of %d)", out.report_key, out.org_name,
                         out.policy_published.domain, len(out.records), out.part, out.parts)
        self.handled.put(event.message_id, {"read_at": utcnow().isoformat(), "events": len(events)})
        return events


def to_events(event: ev.Event, envelope: ev.Envelope, dmarc: str | None, from_header: str | None,
              found: list[Report | Unreadable]) -> list[ev.Event]:
    """The dmarc.reports events for what was found in one message."""
    out: list[ev.Event] = []
    for item in found:
        received = ev.DmarcReportMessage(
            mail_from=envelope.mail_from[:MAX_VALUE], from_header=from_header, client_ip=envelope.client_ip,
            dmarc=dmarc, attachment=item.attachment[:MAX_VALUE] if item.attachment else None,
            content_type=item.content_type)
        if isinstance(item, Unreadable):
            out.append(ev.DmarcReportUnreadable(
                message_id=event.message_id, session_id=event.session_id,
                report_key=f"{event.message_id}#{item.part}", error=item.error, size=item.size, received=received))
            continue
        groups = split_rows(item.rows)
        for number, rows in enumerate(groups, 1):
            out.append(ev.DmarcReportReceived(
                message_id=event.message_id, session_id=event.session_id, **item.fields, records=rows,
                part=number, parts=len(groups), received=received))
    return out


async def serve(settings: Settings) -> None:
    configure_logging("dmarc-reports")
    policy = PolicyHolder(settings=settings)
    await policy.start()
    handled = JsonIndex(settings.data_dir / "dmarc-reports" / "handled")
    publisher = await start_publisher(settings, GROUP)
    sink = DmarcReportSink(settings, policy, publisher, handled)
    metrics.EVENT_BACKLOG.set_function(lambda: publisher.backlog)
    metrics_server = metrics.start("dmarc-reports", settings)
    try:
        await run_until_signalled(consume(settings, GROUP, [VERDICTS.name, QUARANTINE.name], sink.take, batched=True))
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await publisher.stop()
        await policy.stop()
        handled.close()

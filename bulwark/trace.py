"""``bulwark trace``: the whole timeline of a message or a session, from Kafka alone.

Message topics are keyed by message id, so a message's records are found by
key; its session's records are on ``smtp.sessions`` under the client's IP.
A DSN that a bounce produced is followed too.

This reads the topics from the beginning. That is fine for a gateway's first
months; at scale, a Faust table indexing ids to offsets would make it O(1).
"""

from __future__ import annotations

from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, RECEIVED, SESSIONS, VERDICTS

from bulwark.kafka import Record, read_topics
from bulwark.settings import Settings

MESSAGE_TOPICS = [RECEIVED.name, VERDICTS.name, DELIVERIES.name, QUARANTINE.name]


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


async def trace(settings: Settings, ident: str) -> list[Record]:
    """Records about a message id or a session id, in the order they happened."""
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
    order = {name: i for i, name in enumerate([SESSIONS.name, *MESSAGE_TOPICS])}
    return sorted(records, key=lambda r: (r.event.occurred_at, order[r.topic], r.offset))


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
            return f"released from quarantine by {event.by}{to}"
        case ev.QuarantineDeleted():
            return f"deleted from quarantine by {event.by}"
    return event.TYPE

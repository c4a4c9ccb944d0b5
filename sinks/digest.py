"""Per-user quarantine digests, sent by the delivery process.

Every ``quarantine_digest.every_hours`` (aligned to the clock: a 24-hour
period starts at 00:00 UTC), each local recipient of inbound messages held
in the period just ended, and still held, gets one email listing them:
sender, subject, when, why, and for each message a user may release (not
held by a check in ``never_user_releasable``) a signed link to the console
that releases it to them, valid for ``link_hours`` (console/digest_links.py).

``BULWARK_DIGEST_PERIOD_SECONDS`` replaces the policy's period with one of
that many seconds (aligned the same way): a test, or a demonstration, sees
a period boundary pass without waiting an hour or faking the clock.

A digest is queued like any other delivery (the hijack notification's way,
sinks/notify.py), under an id made of the period and the recipient, so a
restart, or a second delivery process, never sends one twice. It comes from
the null sender, so a failed digest bounces nowhere.

The quarantine sink's index is read read-only, as the console reads it: the
delivery process runs where the quarantine's data directory is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING

from schemas import events as ev
from schemas.events import utcnow

if TYPE_CHECKING:
    from bulwark.policy import Policy
    from sinks.delivery import DeliverySink

log = logging.getLogger(__name__)


#: The digester wakes this long after a boundary: a message the quarantine sink
#: held in the period's last instant is in its index by then.
GRACE_SECONDS = 2.0


def period_seconds(policy: "Policy", settings=None) -> int:
    """The digest period: ``BULWARK_DIGEST_PERIOD_SECONDS`` when set, else the policy's ``every_hours``."""
    override = getattr(settings, "digest_period_seconds", None)
    return override if override else policy.quarantine_digest.every_hours * 3600


def period_end(now: datetime, seconds: int) -> datetime:
    """The latest period boundary at or before ``now`` (multiples of the period since the epoch)."""
    return datetime.fromtimestamp(int(now.timestamp()) // seconds * seconds, timezone.utc)


def digest_id(end: datetime, recipient: str) -> str:
    """The digest's queue id: one per period and recipient (a period of whole hours keeps the hour's form)."""
    stamp = f"{end:%Y%m%d%H}" if end.minute == end.second == 0 else f"{end:%Y%m%d%H%M%S}"
    return f"digest-{stamp}-{hashlib.sha256(recipient.encode()).hexdigest()[:20]}"


def user_releasable(record: dict, policy: "Policy") -> bool:
    never = set(policy.quarantine_digest.never_user_releasable)
    return not any(r.get("check") in never and r.get("outcome") != "pass" for r in record.get("results", []))


def held_for(records: list[dict], policy: "Policy", start: datetime, end: datetime) -> dict[str, list[dict]]:
    """Local recipient -> the inbound messages held for them in [start, end), still held, oldest first."""
    out: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r.get("quarantined_at", "")):
        if record.get("state") != "quarantined" or record.get("direction") != "inbound":
            continue
        held = datetime.fromisoformat(record["quarantined_at"])
        if not start <= held < end:
            continue
        for rcpt in record["envelope"]["rcpt_to"]:
            if policy.is_local_domain(rcpt.rpartition("@")[2]):
                out.setdefault(rcpt.lower(), []).append(record)
    return out


def digest_message(policy: "Policy", recipient: str, items: list[tuple[dict, str, str | None]],
                   start: datetime, end: datetime, now: datetime) -> bytes:
    """The digest email. ``items``: (record, subject, release URL or None)."""
    settings = policy.quarantine_digest
    msg = EmailMessage()
    msg["From"] = f"Bulwark quarantine <postmaster@{policy.hostname}>"
    msg["To"] = recipient
    msg["Subject"] = f"Quarantine: {len(items)} message{'' if len(items) == 1 else 's'} held for you"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=policy.hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    lines = [f"These messages for {recipient} were held by the mail gateway between "
             f"{start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC and are still held.", ""]
    for record, subject, url in items:
        envelope = record["envelope"]
        lines += [f"From:     {envelope.get('mail_from') or '<>'}",
                  f"Subject:  {subject}",
                  f"Held at:  {record['quarantined_at'][:16].replace('T', ' ')} UTC",
                  f"Why:      {', '.join(record.get('reasons', []))}"]
        lines.append(f"Release it to yourself (the link works for {settings.link_hours} hours, once):\n  {url}"
                     if url else "Only an administrator can release this one.")
        lines.append("")
    lines.append("If you expected none of these, you need do nothing: held messages are never delivered "
                 "unless someone releases them.")
    msg.set_content("\n".join(lines))
    return msg.as_bytes()


def subject_of(raw: bytes | None) -> str:
    import email
    import email.policy

    if raw is None:
        return "(unavailable)"
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        return " ".join(str(parsed.get("Subject", "")).split())[:200] or "(no subject)"
    except Exception:  # a header the parser trips over: the digest still goes
        return "(unreadable subject)"


async def queue_digests(sink: "DeliverySink", records: list[dict], links, now: datetime | None = None) -> list[str]:
    """Queue the digests of the period that ended last; returns the ids queued (none twice)."""
    policy = sink.policy.current if hasattr(sink.policy, "current") else sink.policy
    settings = policy.quarantine_digest
    now = now or utcnow()
    seconds = period_seconds(policy, getattr(sink, "settings", None))
    end = period_end(now, seconds)
    start = end - timedelta(seconds=seconds)
    queued = []
    for recipient, held in held_for(records, policy, start, end).items():
        message_id = digest_id(end, recipient)
        if message_id in sink.queue:
            continue
        items = []
        for record in held:
            try:
                raw = await sink.blobs.get(record["envelope"]["sha256"])
            except Exception:
                raw = None
            url = None
            if user_releasable(record, policy):
                url = f"{settings.console_url.rstrip('/')}/digest/{links.token(record['message_id'], recipient)}"
            items.append((record, subject_of(raw), url))
        raw = digest_message(policy, recipient, items, start, end, now)
        digest = await sink.blobs.put(raw)
        envelope = ev.Envelope(mail_from="", rcpt_to=[recipient], sha256=digest, size=len(raw),
                               client_ip="127.0.0.1", client_helo=policy.hostname, received_at=now)
        # "notification": mail the gateway writes itself (signed with DKIM as
        # such; delivery.queued's source names no other kind for it).
        entry = sink._entry(message_id, None, "notification", envelope, envelope.rcpt_to)
        sink.queue.put(message_id, entry)
        await sink._announce(entry)
        sink._schedule(entry)
        queued.append(message_id)
    if queued:
        log.info("queued %d quarantine digest(s) for %s to %s", len(queued), start.isoformat(), end.isoformat())
    return queued


def read_quarantine(settings) -> list[dict]:
    """The quarantine index's records, read-only; none before the quarantine sink made it."""
    from sinks.quarantine import index_path
    from sinks.store import JsonIndex

    path = index_path(settings)
    if not path.exists():
        return []
    index = JsonIndex(path, read_only=True)
    try:
        return [record for _, record in index.items()]
    finally:
        index.close()


async def digester(settings, sink: "DeliverySink") -> None:
    """The delivery process's digest job: at start-up (the last period, if not sent) and at each boundary."""
    from console.digest_links import DigestLinks, load_key

    links = None
    while True:
        policy = sink.policy.current if hasattr(sink.policy, "current") else sink.policy
        every = period_seconds(policy, settings)
        if policy.quarantine_digest.enabled:
            try:
                links = links or DigestLinks(load_key(settings.data_dir))
                records = await asyncio.to_thread(read_quarantine, settings)
                await queue_digests(sink, records, links)
            except Exception as exc:  # never stops deliveries; tried again at the next boundary
                log.warning("quarantine digests not queued (%s: %s)", type(exc).__name__, exc)
        now = utcnow()
        # Wake just after the next boundary (or within the hour, to follow a policy change).
        wait = (period_end(now, every) + timedelta(seconds=every) - now).total_seconds() + GRACE_SECONDS
        await asyncio.sleep(min(max(wait, 1.0), 3600))

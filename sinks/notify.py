"""Administrator notifications, written by Bulwark and delivered by the delivery sink.

Account Hijack Detection: when an account is disabled automatically, the
administrators the policy names (``hijack.notify``, else postmaster at the
first local domain) get an email with the account, the counts, the window,
the client addresses involved and how to re-enable it.

The delivery sink queues each notification like any other delivery, under the id of the event
that caused it, so a redelivered event finds it already queued and nobody is
told twice. It is sent from the null sender, like a DSN, so a failed
notification never bounces back into the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING

from schemas import events as ev
from schemas.events import utcnow

if TYPE_CHECKING:
    from bulwark.policy import Policy

HIJACK_DETECTION = "account-hijack-detection"
#: A disable older than this when first seen (a new sink reading old history)
#: is not news any more.
STALE_AFTER = timedelta(days=1)


def administrators(policy: "Policy") -> list[str]:
    return list(policy.hijack.notify) or [f"postmaster@{policy.local_domains[0]}"]


def hijack_notification(policy: "Policy", event: ev.AccountStateChanged) -> bytes:
    details = event.details
    ips = details.get("client_ips") or []
    msg = EmailMessage()
    msg["From"] = f"Bulwark <postmaster@{policy.hostname}>"
    msg["To"] = ", ".join(administrators(policy))
    msg["Subject"] = f"Account Hijack Detection: {event.address} disabled"
    msg["Date"] = format_datetime(event.occurred_at)
    msg["Message-ID"] = make_msgid(domain=policy.hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    msg.set_content(
        f"""Account Hijack Detection disabled the account {event.address}.

Messages sent:   {details.get('messages')} (no more than {details.get('limit')} allowed)
Window:          {details.get('window_minutes')} minutes, {details.get('window_start')} to {details.get('window_end')}
Disabled at:     {event.occurred_at.isoformat(timespec='seconds')}
Client addresses:
{chr(10).join(f'  {ip}' for ip in ips) or '  (none recorded)'}

Until it is enabled again, AUTH and mail from this account are refused.
If the account's password may be known to someone else, change it first:

  bulwark accounts passwd {event.address}
  bulwark accounts enable {event.address}

Event {event.event_id} on accounts.state (bulwark trace {event.event_id}).
"""
    )
    return msg.as_bytes()


@dataclass(frozen=True)
class Notification:
    """A message for the administrators, for the delivery sink to queue."""

    #: The id of the event that caused it: a redelivered event finds it queued.
    message_id: str
    session_id: str | None
    raw: bytes
    recipients: list[str]


def notifications(policy: "Policy", events: list[ev.Event]) -> Iterator[Notification]:
    """A notification for each account the hijack detection disabled, unless that is old news."""
    for event in events:
        if not (isinstance(event, ev.AccountStateChanged) and not event.enabled and event.by == HIJACK_DETECTION):
            continue
        if utcnow() - event.occurred_at > STALE_AFTER:
            continue
        yield Notification(event.event_id, event.session_id, hijack_notification(policy, event),
                           administrators(policy))

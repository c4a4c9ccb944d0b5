"""Back-pressure from the event log: no new work while audit events pile up.

Every SMTP command is an audit event on ``smtp.sessions``; during a broker
outage they wait, unacknowledged, in this process. Past the publisher's
backlog limit (``BULWARK_AUDIT_BACKLOG_LIMIT``) new connections get 421 and
MAIL gets 451, as Postfix's smtpd answers 421 when its queue file system is
full: the client retries later, nothing is accepted that could not be
recorded, and memory stays bounded. Sessions already under way finish.
"""

from __future__ import annotations

from ingest.guards import Refusal

CONNECT_REPLY = "421 4.3.2 Service temporarily unavailable: the event log is behind; try again later"
MAIL_REPLY = "451 4.3.0 The event log is behind; try again later"


class EventBacklogGuard:
    def __init__(self, publisher):
        self.publisher = publisher

    def _reason(self) -> str:
        return f"event log backlog: {self.publisher.backlog} audit events unacknowledged"

    async def on_connect(self, session) -> Refusal | None:
        if self.publisher.backlogged:
            return Refusal(CONNECT_REPLY, self._reason(), close=True)
        return None

    async def on_mail(self, session, address, options) -> Refusal | None:
        if self.publisher.backlogged:
            return Refusal(MAIL_REPLY, self._reason())
        return None

"""Dynamic Screening at ingest: enforce the bans the streams publish.

The bans live on the compacted ``screening.bans`` topic, written by the
Dynamic Screening agent (``streams/screening.py``), which counts; this guard
only enforces, from memory (a :class:`bulwark.state.StateView` of the topic),
so no reply waits on anything remote.

- at connect, a banned client is answered 421 (a temporary refusal: the ban
  expires) with the reason and the time it ends, and the connection closed;
- when "close SMTP session after banning" is on, a session already open from
  a banned address is answered 421 and closed at its next command;
- AUTH from a banned address is refused before any password is checked.

Domain mail servers and allow-listed clients are never refused here, even if
a ban for them is on the topic (one issued before they were listed, or for a
client allow-listed by host name, which the streams cannot resolve).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bulwark.state import StateView
from ingest.guards import Refusal
from ingest.guards.lists import allow_listed
from schemas import events as ev
from streams.screening import exempt

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession

#: Commands still answered for a banned session: it is leaving anyway.
LEAVING = {"QUIT"}


class DynamicScreeningGuard:
    name = "dynamic-screening"

    def __init__(self, policy: Any, bans: StateView):
        self._policy = policy  # a PolicyHolder: read at the moment of deciding
        self.bans = bans

    @property
    def policy(self):
        return getattr(self._policy, "current", self._policy)

    def active_ban(self, ip: str, now: datetime | None = None) -> ev.BanIssued | None:
        ban = self.bans.get(ip)
        if not isinstance(ban, ev.BanIssued):  # none, or lifted (BanLifted)
            return None
        if ban.expires_at <= (now or datetime.now(timezone.utc)):
            return None  # bans expire on their own
        if exempt(self.policy, ip):
            return None
        return ban

    def _banned(self, session: "GuardSession", close: bool = True) -> Refusal | None:
        ip = session.client_ip
        ban = self.active_ban(ip)
        if ban is None or allow_listed(self.policy, session, "dynamic_screening"):
            return None
        until = ban.expires_at.strftime("%H:%M:%S UTC")
        why = ban.reason.removeprefix("Dynamic Screening: ")
        return Refusal(f"421 4.7.0 {ip} is banned by Dynamic Screening until {until} ({why})",
                       f"Dynamic Screening ban: {ban.reason}", close=close)

    async def on_connect(self, session: "GuardSession") -> Refusal | None:
        return self._banned(session)

    async def on_command(self, session: "GuardSession", command: str) -> Refusal | None:
        if command in LEAVING or not self.policy.screening.close_session_after_ban:
            return None
        return self._banned(session)

    async def on_auth(self, session: "GuardSession", login: str) -> Refusal | None:
        # A password from a banned address is never checked, even in a
        # session left open ("close SMTP session after banning" off).
        return self._banned(session, close=self.policy.screening.close_session_after_ban)

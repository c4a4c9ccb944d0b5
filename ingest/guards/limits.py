"""Session limits: recipients per message, commands per session, session
duration and message size.

Over a limit the client gets the code RFC 5321 and RFC 3463 give for it and
the session event records why (Dynamic Screening counts those events):

- recipients per message: 452 4.5.3 at RCPT (RFC 5321 4.5.3.1.10: the client
  sends the rest in another transaction);
- commands per session: 421 4.7.0 and the session is closed; RCPTs bound for
  452 (the recipient limit) are not counted, up to ``recipient_overshoot_limit``;
- session duration: 421 4.4.2 and the session is closed, whatever it was doing;
- message size (advertised as SIZE): 552 5.3.4 at MAIL (SIZE=) or end of DATA;
- no valid command for ``command_timeout_seconds``: 421 4.4.2 and closed;
- under stress (``stress_sessions`` open at once), no complete line for
  ``stress_timeout_seconds`` while the gateway waits for the client: 421
  4.4.2 and closed, as Postfix's smtpd does with ``${stress?{10}:{300}}s``;
- a STARTTLS whose handshake does not finish within
  ``tls_handshake_timeout_seconds``: dropped (no reply can be sent, the
  connection is half-way to TLS).

aiosmtpd enforces the size itself, before any hook, with replies that lack
enhanced status codes; :func:`size_reply` rewrites those and says why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from bulwark import metrics
from bulwark.policy import Policy
from bulwark.policy.runtime import current
from ingest.guards import Refusal
from ingest.guards.lists import allow_listed

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession

log = logging.getLogger(__name__)

#: aiosmtpd 1.4's own replies when data_size_limit is exceeded.
_AIOSMTPD_SIZE_AT_MAIL = "552 Error: message size exceeds fixed maximum message size"
_AIOSMTPD_SIZE_AT_DATA = "552 Error: Too much mail data"


def size_reply(status: str, limit: int) -> tuple[str, str, str] | None:
    """(reply, phase, reason) replacing aiosmtpd's size refusal, or None."""
    if status == _AIOSMTPD_SIZE_AT_MAIL:
        return ("552 5.3.4 Message size exceeds fixed maximum message size", "MAIL",
                f"session limit: declared SIZE over {limit} bytes")
    if status == _AIOSMTPD_SIZE_AT_DATA:
        return ("552 5.3.4 Message size exceeds fixed maximum message size", "DATA",
                f"session limit: message over {limit} bytes")
    return None


def recipients_refusal(policy: Policy, accepted_so_far: int) -> Refusal | None:
    limit = policy.session_limits.max_recipients_per_message
    if accepted_so_far >= limit:
        return Refusal("452 4.5.3 Too many recipients", f"session limit: more than {limit} recipients per message")
    return None


def commands_refusal(policy: Policy, commands: int) -> Refusal | None:
    limit = policy.session_limits.max_commands_per_session
    if commands > limit:
        return Refusal(f"421 4.7.0 {policy.hostname} Too many commands, closing connection",
                       f"session limit: more than {limit} commands", close=True)
    return None


def duration_refusal(policy: Policy) -> Refusal:
    limit = policy.session_limits.max_duration_seconds
    return Refusal(f"421 4.4.2 {policy.hostname} Session time limit exceeded, closing connection",
                   f"session limit: open longer than {limit} seconds", close=True)


class SessionLimitsGuard:
    name = "session_limits"

    def __init__(self, policy: Policy):
        self.policy = policy  # a PolicyHolder in the server: read when judging

    async def on_rcpt(self, session: "GuardSession", recipient: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        if allow_listed(policy, session, "session_limits"):
            return None
        envelope = getattr(session, "envelope", None)
        return recipients_refusal(policy, len(envelope.rcpt_tos) if envelope is not None else 0)

    async def on_command(self, session: "GuardSession", command: str) -> Refusal | None:
        policy = current(self.policy)
        limits = policy.session_limits
        envelope = getattr(session, "envelope", None)
        if command == "RCPT" and envelope is not None and len(envelope.rcpt_tos) >= limits.max_recipients_per_message:
            # Bound to be answered 452: RFC 5321 4.5.3.1.10 has the client
            # send DATA for the recipients accepted, so these are not counted
            # as commands, up to the overshoot limit (then they are).
            session.recipient_overshoot = getattr(session, "recipient_overshoot", 0) + 1
            if session.recipient_overshoot <= limits.recipient_overshoot_limit:
                return None
        session.commands = getattr(session, "commands", 0) + 1
        if allow_listed(policy, session, "session_limits"):
            return None
        return commands_refusal(policy, session.commands)


class SessionClock:
    """Ends a session that stays open longer than the policy allows.

    A timer, not a check at the next command: a client that opens a session
    and then sends nothing (or trickles DATA) is exactly the one to end.
    """

    def __init__(self, server, policy: Policy, on_expiry):
        self._server = server
        self._on_expiry = on_expiry
        self._policy = policy
        self._handle = asyncio.get_running_loop().call_later(
            policy.session_limits.max_duration_seconds, self._expire)

    def _expire(self) -> None:
        transport = self._server.transport
        if transport is None or transport.is_closing():
            return
        session = self._server.session
        if allow_listed(self._policy, session, "session_limits"):
            return
        refusal = duration_refusal(self._policy)
        transport.write(f"{refusal.reply}\r\n".encode())
        metrics.smtp_reply(refusal.reply)
        self._on_expiry(session, refusal)
        transport.close()

    def cancel(self) -> None:
        self._handle.cancel()


def timeout_refusal(policy: Policy, reason: str) -> Refusal:
    return Refusal(f"421 4.4.2 {policy.hostname} Error: timeout exceeded, closing connection",
                   f"session limit: {reason}", close=True)


class SessionTimeouts:
    """How long a session may keep the gateway waiting, and whether ingest is under stress.

    One per ingest process, shared by every listener: stress is how many
    sessions are open at once, whichever port they came to. Idle and
    slow-trickling clients cost a socket and some memory each; in the
    ordinary case the RFC's five minutes is what a mail server owes them,
    but when too many are open at once a client that keeps the gateway
    waiting more than a few seconds is closed, so the sockets go to clients
    that talk.
    """

    def __init__(self, policy: Policy, share: float = 1.0):
        self._policy = policy  # a PolicyHolder in the server: read at every decision
        self.open = 0
        # With several ingest processes on the same ports each holds about
        # its share of the sessions, so each is under stress at its share
        # of the limit.
        self._share = share

    @property
    def limits(self):
        return current(self._policy).session_limits

    @property
    def under_stress(self) -> bool:
        return self.open >= max(1, round(self.limits.stress_sessions * self._share))

    def handshake_seconds(self) -> float:
        return self.limits.tls_handshake_timeout_seconds

    def expired(self, since_command: float, since_line: float, waiting_for_client: bool) -> Refusal | None:
        """The refusal ending a session that has kept the gateway waiting too long, or None.

        ``since_command``: seconds since its last valid command (aiosmtpd's
        timer, which a trickle of bytes or junk lines never resets; DATA
        counts from the DATA command); ``since_line``: since the last
        complete line it sent or the last reply it was sent, whichever came
        later; ``waiting_for_client``: the gateway is reading, not working
        on a reply (a verdict or a password check is never cut short).
        """
        limits = self.limits
        policy = current(self._policy)
        if since_command >= limits.command_timeout_seconds:
            return timeout_refusal(policy, f"no command for {limits.command_timeout_seconds} seconds")
        if waiting_for_client and self.under_stress and since_line >= limits.stress_timeout_seconds:
            return timeout_refusal(policy, f"no complete line for {limits.stress_timeout_seconds} seconds "
                                           f"with {self.open} sessions open (stress)")
        return None

    def next_check(self, since_command: float, since_line: float = 0.0) -> float:
        """Seconds until a session should be looked at again: when it would
        reach the command timeout, or the stress timeout (or, past that, one
        stress timeout later, in case stress begins meanwhile)."""
        limits = self.limits
        stress = limits.stress_timeout_seconds
        until_stress = stress - since_line if since_line < stress else stress
        return max(0.5, min(limits.command_timeout_seconds - since_command, until_stress))

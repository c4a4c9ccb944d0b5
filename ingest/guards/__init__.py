"""Guards: what ingest decides during the SMTP dialogue, one module per defence.

Modelled on Haraka's hooks. A guard is an object with any of these async
methods, named after the SMTP phase it judges:

    on_connect(session)                 before the banner
    on_command(session, command)        every recognised command (session limits)
    on_auth(session, login)             AUTH, before the password is checked
    on_mail(session, sender, params)    MAIL FROM
    on_rcpt(session, recipient, params) RCPT TO
    on_data(session, raw)               end of DATA, before the message is recorded

Each returns ``None`` to let the dialogue continue or a :class:`Refusal`,
which is the SMTP reply and the reason recorded in the session event. The
first refusal wins. Guards hold no message state of their own; what they need
(policy, in-memory state built from compacted topics) they get when built.
A guard is enabled by the policy, and absent otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession


@dataclass(frozen=True)
class Refusal:
    reply: str
    reason: str
    #: End the session after this reply (a 421, say, for a banned client).
    close: bool = False

    @property
    def code(self) -> int:
        return int(self.reply[:3])


PHASES = ("on_connect", "on_command", "on_auth", "on_mail", "on_rcpt", "on_data")


async def judge(guards: list[Any], phase: str, session: "GuardSession", *args) -> Refusal | None:
    for guard in guards:
        hook = getattr(guard, phase, None)
        if hook is None:
            continue
        refusal = await hook(session, *args)
        if refusal is not None:
            return refusal
    return None

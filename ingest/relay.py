"""Relay control at RCPT: accept mail only to local domains unless the client may relay.

The decision rests on the client's address (a domain mail server) or its
authentication, never on the sender address it claims.
"""

from __future__ import annotations

from dataclasses import dataclass

from bulwark.policy import Policy


@dataclass(frozen=True)
class Refusal:
    reply: str
    reason: str

    @property
    def code(self) -> int:
        return int(self.reply[:3])


RELAY_DENIED = Refusal("554 5.7.1 Relay access denied", "relay denied")


def _smuggles_route(local_part: str) -> bool:
    # user%other.example@local, bang paths and a second @ ask the downstream
    # server to forward the mail elsewhere: a relay through a local domain.
    return any(c in local_part for c in "%!@")


def check_recipient(policy: Policy, address: str, may_relay: bool) -> Refusal | None:
    """None to accept, else the refusal."""
    if address.startswith("@") or ":" in address.split("@", 1)[0]:
        return Refusal("553 5.7.1 Source routes are not accepted", "source route")
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return Refusal("553 5.1.3 Recipient address must be user@domain", "malformed address")
    if domain.startswith("["):
        return Refusal("553 5.7.1 Address literals are not accepted", "address literal")
    if policy.is_local_domain(domain):
        if _smuggles_route(local.strip('"')):
            return Refusal("553 5.7.1 Routing characters in a local address are not accepted", "relay attempt")
        return None
    return None if may_relay else RELAY_DENIED

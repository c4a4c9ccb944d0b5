"""Relay control at RCPT: accept mail only to local domains unless the client may relay.

The decision rests on the client's address (a domain mail server) or its
authentication, never on the sender address it claims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bulwark.policy import Policy
from ingest.guards import Refusal

if TYPE_CHECKING:
    from ingest.server import GatewaySession

RELAY_DENIED = Refusal("554 5.7.1 Relay access denied", "relay denied")


def _smuggles_route(local_part: str) -> bool:
    # user%other.example@local, bang paths and a second @ ask the downstream
    # server to forward the mail elsewhere: a relay through a local domain.
    return any(c in local_part for c in "%!@")


def may_relay(policy: Policy, session: "GatewaySession") -> bool:
    return bool(session.authenticated) or policy.is_domain_mail_server(session.client_ip)


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


class RelayGuard:
    name = "relay"

    def __init__(self, policy: Policy):
        self.policy = policy

    async def on_rcpt(self, session: "GatewaySession", recipient: str, params: list[str]) -> Refusal | None:
        return check_recipient(self.policy, recipient, may_relay(self.policy, session))

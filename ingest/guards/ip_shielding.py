"""IP Shielding: a session claiming a shielded domain must come from that domain's addresses.

The policy's domain/IP pairs (``$LOCALDOMAIN$`` stands for every local domain)
are checked against the MAIL FROM domain, and, when ``check_from_header`` is
on, against the From header's addresses at the end of DATA. A domain with no
pair is not shielded. Authenticated sessions are exempt when
``exempt_authenticated`` says so (AUTH is the stronger proof). The refusal
names the rule: the domain and the pairs that would have let it through.
"""

from __future__ import annotations

import ipaddress
from email.utils import getaddresses
from typing import TYPE_CHECKING

from bulwark.policy import Policy
from bulwark.policy.runtime import current
from bulwark.policy.sections import ShieldPair
from bulwark.headers import parse_headers
from ingest.guards import Refusal
from ingest.guards.lists import allow_listed

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession


def pairs_for(policy: Policy, domain: str) -> list[tuple[int, ShieldPair]]:
    """(1-based rule number, pair) of the pairs that shield this domain."""
    return [(n, pair) for n, pair in enumerate(policy.ip_shielding.pairs, 1)
            if pair.covers(domain, policy.local_domains)]


def _inside(ip: str, pair: ShieldPair) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(pair.ip)
    except ValueError:
        return False


def shield_lets_send_without_auth(policy: Policy, client_ip: str, domain: str) -> bool:
    """A pair marked send_without_auth (a printer, say) covers this client and domain."""
    return policy.ip_shielding.enabled and any(
        pair.send_without_auth and _inside(client_ip, pair) for _, pair in pairs_for(policy, domain))


def judge_domain(policy: Policy, client_ip: str, domain: str, where: str) -> Refusal | None:
    """None if the domain is unshielded or the client is inside one of its pairs."""
    shielding = pairs_for(policy, domain)
    if not shielding or any(_inside(client_ip, pair) for _, pair in shielding):
        return None
    rules = ", ".join(f"#{n} {pair.domain} {pair.ip}" for n, pair in shielding)
    numbers = ", ".join(f"#{n}" for n, _ in shielding)
    return Refusal(
        f"550 5.7.1 IP Shielding: mail {where} {domain} is not accepted from your address "
        f"(rule{'s' if len(shielding) > 1 else ''} {numbers})",
        f"ip shielding: {where} {domain} not from {client_ip}; allowed by {rules}",
    )


def from_header_domains(raw: bytes) -> list[str]:
    headers = parse_headers(raw)
    values = headers.get_all("From") or []
    return [addr.rpartition("@")[2].lower() for _, addr in getaddresses([str(v) for v in values]) if "@" in addr]


class IPShieldingGuard:
    name = "ip_shielding"

    def __init__(self, policy: Policy):
        self.policy = policy  # a PolicyHolder in the server: read when judging

    def _exempt(self, policy: Policy, session: "GuardSession") -> bool:
        shielding = policy.ip_shielding
        return (not shielding.enabled
                or (shielding.exempt_authenticated and bool(session.authenticated))
                or allow_listed(policy, session, "ip_shielding"))

    async def on_mail(self, session: "GuardSession", sender: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        if not sender or "@" not in sender or self._exempt(policy, session):
            return None
        return judge_domain(policy, session.client_ip, sender.rpartition("@")[2].lower(), "from")

    async def on_data(self, session: "GuardSession", raw: bytes) -> Refusal | None:
        policy = current(self.policy)
        if not policy.ip_shielding.check_from_header or self._exempt(policy, session):
            return None
        for domain in from_header_domains(raw):
            refusal = judge_domain(policy, session.client_ip, domain, "with a From header in")
            if refusal is not None:
                return refusal
        return None

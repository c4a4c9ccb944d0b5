"""The guide's virus-scanning Exclusions, shared by the antivirus and macros checks.

"Do not scan messages from whitelisted IP addresses / from domain mail
servers / sent from email addresses listed below": each off by default, set
per check (``checks: antivirus:`` and ``checks: macros:`` in the policy).
A leading underscore keeps this module out of check discovery.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from streams.checks import CheckSettings
from streams.message import Message


class ScanExclusions(CheckSettings):
    """Whose messages are not scanned at all (the guide's Exclusions). Each is off by default."""

    exclude_allow_listed_ips: bool = Field(
        default=False, description="Do not scan mail from client addresses on the policy's allow_list"
    )
    exclude_domain_mail_servers: bool = Field(
        default=False, description="Do not scan mail sent by the domain mail servers (policy mail_servers)"
    )
    exclude_senders: list[str] = Field(
        default_factory=list, description="Do not scan mail from these envelope senders (MAIL FROM)"
    )

    @field_validator("exclude_senders")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            local, _, domain = item.strip().rpartition("@")
            if not local or not domain:
                raise ValueError(f"{item!r} is not an email address")
        return [item.strip().lower() for item in value]


def exclusion(message: Message, settings: ScanExclusions) -> str | None:
    """Why this message is not to be scanned, or None when it is."""
    policy, client_ip = message.policy, message.envelope.client_ip
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        ip = None
    if settings.exclude_allow_listed_ips and ip is not None and policy is not None:
        # Addresses only: the guide excludes allow-listed IP addresses, and
        # host names would need the session's reverse DNS.
        if any(ip in ipaddress.ip_network(net, strict=False) for net in policy.allow_list.addresses):
            return f"client {client_ip} is allow-listed"
    if settings.exclude_domain_mail_servers and ip is not None and policy is not None:
        if policy.is_domain_mail_server(client_ip):
            return f"client {client_ip} is a domain mail server"
    sender = message.envelope.mail_from.lower()
    if sender and sender in settings.exclude_senders:
        return f"sender {sender} is excluded"
    return None

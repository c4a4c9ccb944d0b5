"""Allow and block lists: client addresses and ranges, client host names,
sender addresses and sender domains.

A blocked client is refused at connect, a blocked sender at MAIL. An
allow-listed client or sender skips only what ``allow_list.skips`` names
(by default the block list, Location Screening and Dynamic Screening), and
never relay control. Local addresses and domains cannot be allow-listed at
all (the policy refuses them, quoting the guide).

Other guards ask :func:`allow_listed` whether to skip themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from bulwark.policy import Policy
from bulwark.policy.runtime import current
from bulwark.policy.sections import ClientAndSenderList
from ingest.guards import Refusal

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession

log = logging.getLogger(__name__)

#: How long a reverse DNS lookup may hold up the banner.
RDNS_TIMEOUT = 5.0


def allow_listed(policy: Policy, session: "GuardSession", skip: str) -> bool:
    """Is this session allow-listed (by client or sender) for skipping ``skip``?"""
    if skip not in policy.allow_list.skips:
        return False
    return bool(getattr(session, "allow_listed_client", None) or getattr(session, "allow_listed_sender", None))


def address_match(entries: ClientAndSenderList, ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for net in entries.addresses:
        if address in ipaddress.ip_network(net):
            return f"address {net}"
    return None


def host_match(entries: ClientAndSenderList, host: str | None) -> str | None:
    if not host:
        return None
    host = host.lower().rstrip(".")
    for rule in entries.hosts:
        if host == rule or (rule.startswith(".") and host.endswith(rule)):
            return f"host {rule}"
    return None


def sender_match(entries: ClientAndSenderList, sender: str) -> str | None:
    if not sender:
        return None
    sender = sender.lower()
    if sender in entries.senders:
        return f"sender {sender}"
    domain = sender.rpartition("@")[2]
    for rule in entries.domains:
        if domain == rule:
            return f"domain {rule}"
    return None


async def verified_host_name(ip: str) -> str | None:
    """The client's forward-confirmed reverse DNS name, or None.

    Only a name whose own addresses include the client's counts: a PTR
    record alone is whatever the owner of the address range says it is.
    """
    loop = asyncio.get_running_loop()
    try:
        name, _ = await asyncio.wait_for(loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), RDNS_TIMEOUT)
        infos = await asyncio.wait_for(loop.getaddrinfo(name, None), RDNS_TIMEOUT)
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return None
    return name if any(info[4][0] == ip for info in infos) else None


class ListsGuard:
    name = "lists"

    def __init__(self, policy: Policy):
        self.policy = policy  # a PolicyHolder in the server: read when judging

    async def on_connect(self, session: "GuardSession") -> Refusal | None:
        policy = current(self.policy)
        allow, block = policy.allow_list, policy.block_list
        host = None
        if allow.hosts or block.hosts:
            host = await verified_host_name(session.client_ip)
            session.client_host = host
        allowed = address_match(allow, session.client_ip) or host_match(allow, host)
        session.allow_listed_client = allowed
        blocked = address_match(block, session.client_ip) or host_match(block, host)
        if blocked and not (allowed and "block_list" in allow.skips):
            return Refusal("554 5.7.1 Connections from your address are not accepted",
                           f"block list: {blocked}", close=True)
        return None

    async def on_mail(self, session: "GuardSession", sender: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        allowed = sender_match(policy.allow_list, sender)
        session.allow_listed_sender = allowed  # per transaction: each MAIL sets it anew
        blocked = sender_match(policy.block_list, sender)
        if blocked and not ((allowed or getattr(session, "allow_listed_client", None))
                            and "block_list" in policy.allow_list.skips):
            return Refusal("550 5.7.1 Sender address rejected: blocked by policy", f"block list: {blocked}")
        return None

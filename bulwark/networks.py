"""IP addresses and CIDR ranges as the policy writes them (trusted addresses, exemptions)."""

from __future__ import annotations

import ipaddress


def checked_networks(values: list[str]) -> list[str]:
    """``values`` if each is an address or a CIDR range; ValueError naming the first that is not."""
    for item in values:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return values


def in_networks(ip: str, networks: list[str]) -> bool:
    """``ip`` is one of ``networks``; False for anything that is not an IP address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in networks)

"""Policy sections for the SMTP dialogue's defences: relay control, IP
Shielding, allow and block lists, Location Screening and session limits.

Every default is the best-practice guide's recommendation
(``reference/securitygateway-best-practices.txt``): relaying closed, only
domain mail servers send local mail without AUTH, a local sender must exist,
no relay exceptions, IP Shielding on with the guide's domain/IP pairs.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

#: The guide's macro for "every local domain" in IP Shielding pairs.
LOCALDOMAIN = "$LOCALDOMAIN$"

#: Quoted by the validator, the audit and the docs: the guide's reason.
ALLOW_LOCAL_REASON = (
    "the guide recommends against allow-listing local email addresses: messages sent with a "
    "local address could bypass many of your security settings (anyone can forge a sender "
    "address) and put your server at risk of being blacklisted"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def network(value: str) -> str:
    """An address or CIDR range, normalised (127.0.0.1/8 -> 127.0.0.0/8)."""
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR range (e.g. 192.0.2.7 or 10.0.0.0/8)") from None


def networks(values: list[str]) -> list[str]:
    return [network(v) for v in values]


def domain_name(value: str) -> str:
    value = str(value).strip().lower().rstrip(".")
    if not value or "@" in value or not re.fullmatch(r"[a-z0-9_.*-]+|\[[0-9a-f:.]+\]", value):
        raise ValueError(f"{value!r} is not a domain name")
    return value


def mail_address(value: str) -> str:
    value = str(value).strip().strip("<>")
    local, at, domain = value.rpartition("@")
    if not at or not local:
        raise ValueError(f"{value!r} is not an email address (user@domain)")
    return f"{local}@{domain_name(domain)}"


# -- relay control --------------------------------------------------------------


class RelayExceptions(_Section):
    """The exceptions on the guide's Relay Control screen. It recommends none."""

    relay_for_addresses: list[str] = Field(
        default_factory=list,
        description="Client addresses/CIDR ranges that may relay to any domain without AUTH",
    )
    unknown_local_sender_if_authenticated: bool = Field(
        default=False, description="Let authenticated sessions use local sender addresses that do not exist",
    )
    unknown_local_sender_from_domain_mail_servers: bool = Field(
        default=False, description="Let domain mail servers use local sender addresses that do not exist",
    )

    @field_validator("relay_for_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return networks(value)

    def enabled(self) -> list[str]:
        """Names of the exceptions that are on (for the audit)."""
        on = []
        if self.relay_for_addresses:
            on.append("relay_for_addresses")
        if self.unknown_local_sender_if_authenticated:
            on.append("unknown_local_sender_if_authenticated")
        if self.unknown_local_sender_from_domain_mail_servers:
            on.append("unknown_local_sender_from_domain_mail_servers")
        return on


class RelayControl(_Section):
    only_domain_mail_servers_send_local_mail: bool = Field(
        default=True,
        description="Mail from a local domain is accepted without AUTH only from that domain's mail servers",
    )
    local_sender_must_exist: bool = Field(
        default=True, description="SMTP MAIL address must exist if it uses a local domain",
    )
    exceptions: RelayExceptions = Field(default_factory=RelayExceptions)


# -- IP Shielding ---------------------------------------------------------------


class ShieldPair(_Section):
    domain: str = Field(description=f"A domain, or {LOCALDOMAIN} for every local domain")
    ip: str = Field(description="Address or CIDR range (IPv4 or IPv6) that domain's mail may come from")
    comment: str = ""
    send_without_auth: bool = Field(
        default=False,
        description="Also let these addresses send the domain's mail without SMTP AUTH "
                    "(devices that cannot authenticate, such as printers)",
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return LOCALDOMAIN if value.strip().upper() == LOCALDOMAIN else domain_name(value)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return network(value)

    def covers(self, domain: str, local_domains: list[str]) -> bool:
        domain = domain.lower().rstrip(".")
        return domain in local_domains if self.domain == LOCALDOMAIN else domain == self.domain


#: The guide's screenshot: every local domain from the private ranges and loopback.
DEFAULT_SHIELD_PAIRS = [
    ShieldPair(domain=LOCALDOMAIN, ip=ip)
    for ip in ("10.0.0.0/8", "127.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fd00::/8")
]


class IPShielding(_Section):
    enabled: bool = True
    check_from_header: bool = Field(
        default=True, description="Also check the From header's address at the end of DATA",
    )
    exempt_authenticated: bool = Field(
        default=True, description="Messages from authenticated sessions are exempt (AUTH is the stronger proof)",
    )
    pairs: list[ShieldPair] = Field(default_factory=lambda: list(DEFAULT_SHIELD_PAIRS))


# -- allow and block lists ------------------------------------------------------------


class ClientAndSenderList(_Section):
    addresses: list[str] = Field(default_factory=list, description="Client IP addresses and CIDR ranges")
    hosts: list[str] = Field(
        default_factory=list,
        description="Client host names, forward-confirmed reverse DNS; '.example.net' matches its subdomains",
    )
    senders: list[str] = Field(default_factory=list, description="MAIL FROM addresses")
    domains: list[str] = Field(default_factory=list, description="MAIL FROM domains")

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return networks(value)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [("." + domain_name(h[1:])) if h.startswith(".") else domain_name(h) for h in value]

    @field_validator("senders")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        return [mail_address(v).lower() for v in value]

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [domain_name(v) for v in value]


#: What an allow-listed client or sender may skip. Relay control never.
AllowSkip = Literal["block_list", "location_screening", "dynamic_screening", "ip_shielding", "session_limits"]


class AllowList(ClientAndSenderList):
    skips: list[AllowSkip] = Field(
        default_factory=lambda: ["block_list", "location_screening", "dynamic_screening"],
        description="What allow-listed clients and senders skip; nothing else (never relay control)",
    )


class BlockList(ClientAndSenderList):
    pass


# -- Location Screening ------------------------------------------------------------------


def _countries(value: list[str]) -> list[str]:
    out = []
    for code in value:
        code = str(code).strip().upper()
        if not re.fullmatch(r"[A-Z]{2}", code):
            raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code (e.g. DE, US)")
        out.append(code)
    return out


class LocationScreening(_Section):
    enabled: bool = False
    database: Path | None = Field(default=None, description="MaxMind-format country database (.mmdb)")
    refuse_connections_from: list[str] = Field(default_factory=list, description="Refuse SMTP sessions at connect")
    refuse_auth_from: list[str] = Field(default_factory=list, description="Accept the session, refuse SMTP AUTH")
    refuse_http_from: list[str] = Field(default_factory=list, description="Refuse HTTP requests")
    refuse_http_auth_from: list[str] = Field(default_factory=list, description="Refuse HTTP logins")

    @field_validator("refuse_connections_from", "refuse_auth_from", "refuse_http_from", "refuse_http_auth_from")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return _countries(value)

    @model_validator(mode="after")
    def _database_when_enabled(self) -> "LocationScreening":
        if self.enabled and self.database is None:
            raise ValueError("database: Location Screening is enabled, so it needs the path of a country database")
        if self.enabled and not Path(self.database).is_file():
            raise ValueError(f"database: Location Screening is enabled but {self.database} does not exist")
        return self


# -- session limits ---------------------------------------------------------------------------


class SessionLimits(_Section):
    max_duration_seconds: PositiveInt = Field(
        default=900, description="A session open longer is closed with 421 4.4.2",
    )
    max_recipients_per_message: PositiveInt = Field(
        default=100, description="RCPT beyond this gets 452 4.5.3 (RFC 5321 requires accepting at least 100)",
    )
    max_commands_per_session: PositiveInt = Field(
        default=1000, description="Commands beyond this end the session with 421 4.7.0",
    )
    recipient_overshoot_limit: PositiveInt = Field(
        # Postfix's smtpd_recipient_overshoot_limit. Without it a message to
        # 1,000 recipients, pipelined, ran into the commands limit before DATA.
        default=1000,
        description="RCPTs answered 452 beyond max_recipients_per_message that do not count as commands, so the "
                    "client still reaches DATA for the recipients accepted; past this many in a session they do",
    )
    command_timeout_seconds: PositiveInt = Field(
        # RFC 5321 4.5.3.2.7: a server SHOULD wait at least 5 minutes for the next command.
        default=300, description="A session that sends no valid command for this long is closed with 421 4.4.2",
    )
    tls_handshake_timeout_seconds: PositiveInt = Field(
        # A handshake takes milliseconds; Python's default would hold a silent client 60 s.
        default=10,
        description="After STARTTLS the TLS handshake must finish within this, or the connection is dropped",
    )
    stress_sessions: PositiveInt = Field(
        default=1000, description="With this many sessions open at once ingest is under stress (shorter timeouts)",
    )
    stress_timeout_seconds: PositiveInt = Field(
        # Postfix's smtpd_timeout under stress: ${stress?{10}:{300}}s.
        default=10, description="Under stress, a client that sends no complete line for this long while the gateway "
                                "waits for it is closed with 421 4.4.2",
    )

    @model_validator(mode="after")
    def _stress_is_shorter(self) -> "SessionLimits":
        if self.stress_timeout_seconds > self.command_timeout_seconds:
            raise ValueError("stress_timeout_seconds: longer than command_timeout_seconds; under stress "
                             "timeouts are meant to be shorter")
        return self


# -- delivery credentials ----------------------------------------------------------------------


class SmtpCredentials(_Section):
    """How Bulwark logs in to a domain mail server that requires SMTP AUTH.

    The password itself is never in the policy (the policy is published to
    Kafka): it is read from a file or an environment variable when delivering.
    """

    username: str
    password_file: Path | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SmtpCredentials":
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("give exactly one of password_file or password_env (never the password itself)")
        return self

    def password(self) -> str:
        import os

        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LookupError(f"environment variable {self.password_env} is not set")
            return value
        return Path(self.password_file).read_text().rstrip("\r\n")


def is_local_address(address: str, local_domains: list[str]) -> bool:
    return address.rpartition("@")[2].lower() in local_domains


def allow_list_problems(allow: AllowList, local_domains: list[str]) -> list[tuple[tuple, str]]:
    """(location, message) for every local address or domain on the allow list."""
    problems = []
    for i, sender in enumerate(allow.senders):
        if is_local_address(sender, local_domains):
            problems.append((("allow_list", "senders", i), f"{sender} is a local address: {ALLOW_LOCAL_REASON}"))
    for i, domain in enumerate(allow.domains):
        if domain in local_domains:
            problems.append((("allow_list", "domains", i), f"{domain} is a local domain: {ALLOW_LOCAL_REASON}"))
    return problems

"""Policy sections for the guide's "Verify that a user is valid before creating an account".

``verification_sources`` lists the User Verification Sources (SMTP
call-forward, LDAP, Active Directory, Microsoft 365, Minger);
``user_verification`` says which sources each local domain asks, in order,
and how long answers are cached.

A domain with its own list asks exactly those sources; an explicitly empty
list means "accept every recipient of this domain, create no account" (the
behaviour before verification existed). A domain that is not listed asks the
default sources, as the guide recommends; default sources also vouch for
domains that are not local yet (automatic domain creation).

Secrets (bind passwords, client secrets, the Minger shared secret) are never
in the policy, which is published to Kafka: a source names a file or an
environment variable, read when the source is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret(file: Path | None, env: str | None, what: str) -> str:
    """The secret from its file or variable. Errors name where, never what."""
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise LookupError(f"the {what} variable {env} is not set")
        return value
    if file is None:
        raise LookupError(f"no {what} is configured")
    try:
        return Path(file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise LookupError(f"cannot read the {what} file {file}: {exc.strerror}") from None


def _one_or_none(file: Path | None, env: str | None, what: str, required: bool) -> None:
    if file is not None and env is not None:
        raise ValueError(f"give {what}_file or {what}_env, not both")
    if required and file is None and env is None:
        raise ValueError(f"give {what}_file or {what}_env (never the secret itself: the policy is published)")


class _Source(_Section):
    name: str = Field(description="How events, accounts and `bulwark sources test` refer to this source")
    default: bool = Field(
        default=False,
        description="A default user verification source: serves every domain with no sources of its own, "
        "and vouches for new domains (automatic domain creation)",
    )
    timeout_seconds: float = Field(default=5.0, gt=0, le=120, description="Longest wait for one answer")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: use lower-case letters, digits, '.', '_' and '-'")
        return value

    #: Whether AUTH of accounts this source created can be checked against it.
    def checks_passwords(self) -> bool:
        return False


class SmtpSource(_Source):
    """SMTP call-forward: ask the domain's mail server at RCPT, without DATA."""

    type: Literal["smtp"]
    host: str
    port: int = Field(default=25, ge=1, le=65535)
    mail_from: str = Field(default="", description="MAIL FROM of the probe; empty is the null sender <>")
    helo: str | None = Field(default=None, description="EHLO name; the policy's hostname when unset")
    starttls: bool = Field(default=True, description="Use STARTTLS when the server offers it")
    tls_verify: bool = Field(
        default=False,
        description="Check the server's certificate (opportunistic STARTTLS does not, as between MTAs)",
    )
    ca_file: Path | None = None
    max_connections: PositiveInt = Field(
        default=4, le=100, description="At most this many connections to the server at once; a burst of RCPTs queues"
    )
    idle_seconds: float = Field(default=30.0, gt=0, description="An unused connection is closed (QUIT) after this")


LdapTls = Literal["ldaps", "starttls", "none"]


class LdapSource(_Source):
    """An LDAP directory: a service bind, then a search for the address."""

    type: Literal["ldap"]
    url: str = Field(description="ldap://host:port or ldaps://host:port")
    tls: LdapTls | None = Field(
        default=None, description="ldaps, starttls or none; default: ldaps for ldaps:// URLs, else starttls"
    )
    ca_file: Path | None = Field(default=None, description="CA certificates for the server; the system's when unset")
    bind_dn: str | None = Field(default=None, description="Service account; anonymous search when unset")
    bind_password_file: Path | None = None
    bind_password_env: str | None = None
    base_dn: str
    filter: str = Field(
        default="(|(mail={address})(mailLocalAddress={address}))",
        description="Search filter; {address} is replaced by the escaped address",
    )
    page_size: PositiveInt = Field(default=50, le=1000)
    authenticate: bool = Field(default=True, description="AUTH of accounts it created binds as the user's DN")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^ldaps?://[^/]+/?$", value):
            raise ValueError(f"{value!r} is not ldap://host[:port] or ldaps://host[:port]")
        return value.rstrip("/")

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        if "{address}" not in value or not (value.startswith("(") and value.endswith(")")):
            raise ValueError("the filter must be an LDAP filter in parentheses containing {address}")
        return value

    @model_validator(mode="after")
    def _secret(self):
        _one_or_none(self.bind_password_file, self.bind_password_env, "bind_password", required=self.bind_dn is not None)
        return self

    @property
    def tls_mode(self) -> LdapTls:
        return self.tls or ("ldaps" if self.url.startswith("ldaps://") else "starttls")

    def bind_password(self) -> str | None:
        if self.bind_dn is None:
            return None
        return read_secret(self.bind_password_file, self.bind_password_env, f"bind password of source {self.name}")

    def checks_passwords(self) -> bool:
        return self.authenticate


class ActiveDirectorySource(LdapSource):
    """Active Directory: LDAP with AD's attributes; disabled accounts are not recipients."""

    type: Literal["active_directory"]
    filter: str = Field(
        default="(&(objectClass=user)(|(userPrincipalName={address})(mail={address})"
        "(proxyAddresses=smtp:{address})))",
        description="Search filter; {address} is replaced by the escaped address. proxyAddresses matching "
        "is case-insensitive, so smtp: also finds the primary SMTP: address",
    )


class M365Source(_Source):
    """Microsoft 365: client-credentials token from Entra ID, then Microsoft Graph."""

    type: Literal["m365"]
    tenant_id: str
    client_id: str
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    authority_host: str = Field(default="https://login.microsoftonline.com", description="Token issuer")
    graph_url: str = Field(default="https://graph.microsoft.com/v1.0")
    ca_file: Path | None = Field(default=None, description="CA certificates for both; the system's when unset")
    password_auth: bool = Field(
        default=False,
        description="Let accounts it created AUTH with their Microsoft 365 password (resource-owner password "
        "flow). Off: Microsoft 365 only verifies recipients",
    )

    @field_validator("authority_host", "graph_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secret(self):
        _one_or_none(self.client_secret_file, self.client_secret_env, "client_secret", required=True)
        return self

    def client_secret(self) -> str:
        return read_secret(self.client_secret_file, self.client_secret_env, f"client secret of source {self.name}")

    def checks_passwords(self) -> bool:
        return self.password_auth


class MingerSource(_Source):
    """MDaemon's Minger (draft-hathcock-minger-06): one UDP datagram each way."""

    type: Literal["minger"]
    host: str
    port: int = Field(default=4069, ge=1, le=65535)
    shared_secret_file: Path | None = Field(default=None, description="Anonymous queries when neither is set")
    shared_secret_env: str | None = None
    timeout_seconds: float = Field(default=2.0, gt=0, le=60, description="Wait for one answer before retrying")
    retries: int = Field(default=2, ge=0, le=10, description="Queries resent after a timeout (UDP may drop them)")

    @model_validator(mode="after")
    def _secret(self):
        _one_or_none(self.shared_secret_file, self.shared_secret_env, "shared_secret", required=False)
        return self

    def shared_secret(self) -> str | None:
        if self.shared_secret_file is None and self.shared_secret_env is None:
            return None
        secret = read_secret(self.shared_secret_file, self.shared_secret_env, f"shared secret of source {self.name}")
        # MDaemon requires at least 16 characters (the draft's section 5: at
        # least 128 bits); a shorter one is refused here rather than
        # weakening the hash.
        if len(secret) < 16:
            raise LookupError(f"the shared secret of source {self.name} is shorter than 16 characters")
        # draft-hathcock-minger-06 section 2.1: shared-secret = 1*50(VCHAR).
        if len(secret) > 50 or not all("\x21" <= c <= "\x7e" for c in secret):
            raise LookupError(f"the shared secret of source {self.name} must be at most 50 printable "
                              "ASCII characters without spaces (draft-hathcock-minger-06 section 2.1)")
        return secret


VerificationSource = Annotated[
    Union[SmtpSource, LdapSource, ActiveDirectorySource, M365Source, MingerSource],
    Field(discriminator="type"),
]


class UserVerification(_Section):
    """Which sources each domain asks, and how long their answers are believed."""

    domains: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Local domain -> source names, asked in order; [] turns verification off for the domain. "
        "Domains not listed ask the default sources",
    )
    positive_cache_seconds: int = Field(default=3600, ge=0, description="How long 'this user exists' is believed")
    negative_cache_seconds: int = Field(default=600, ge=0, description="How long 'no such user' is believed")
    auto_create_domains: bool = Field(
        default=True,
        description="A domain that is not local becomes local when a default source confirms a recipient in it",
    )

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {d.strip().lower().rstrip("."): names for d, names in value.items()}


def check_verification(policy) -> None:
    """Cross-section checks, called by the Policy model's validator."""
    names = [s.name for s in policy.verification_sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"verification_sources: {', '.join(dupes)} named more than once")
    for domain, listed in policy.user_verification.domains.items():
        if domain not in policy.local_domains:
            raise ValueError(f"user_verification lists {domain!r}, which is not in local_domains")
        for name in listed:
            if name not in names:
                raise ValueError(f"user_verification: {domain} asks {name!r}, which is not in verification_sources")


def sources_for_domain(policy, domain: str) -> list:
    """The domain's own sources in order, else the default ones (the guide's fallback)."""
    domain = domain.lower().rstrip(".")
    by_name = {s.name: s for s in policy.verification_sources}
    listed = policy.user_verification.domains.get(domain)
    if listed is not None:
        return [by_name[n] for n in listed]
    return [s for s in policy.verification_sources if s.default]


def default_sources(policy) -> list:
    return [s for s in policy.verification_sources if s.default]

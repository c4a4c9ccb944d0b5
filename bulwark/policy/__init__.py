"""The policy: everything an administrator decides, in one YAML file.

The code holds the defaults, and the defaults are the secure ones from the
best-practice guide. A policy that does not validate is never used; the error
names the file, the line and the field, and says what was expected.

The policy's version is a digest of its validated content, so the same rules
always carry the same version wherever they are loaded, and every verdict can
name the rules it was made under.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, field_validator, model_validator,
)

from bulwark.backscatter import BackscatterSettings
from bulwark.networks import checked_networks
from bulwark.policy.dkim import DkimSigning, dkim_problems
from bulwark.policy.dmarc import DmarcReports, dmarc_report_problems
from bulwark.policy.sections import (
    AllowList, BlockList, IPShielding, LocationScreening, RelayControl, SessionLimits, SmtpCredentials,
    allow_list_problems,
)
from bulwark.policy.verification import UserVerification, VerificationSource, check_verification

# "tag" delivers the message marked (X-Bulwark-Tags, tag_subject_prefix):
# a modifier of "deliver", never stronger than any other action.
Action = Literal["deliver", "quarantine", "reject", "redirect", "tag"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not value or "@" in value or " " in value:
        raise ValueError(f"{value!r} is not a domain name")
    return value


class MailServer(_Strict):
    """A downstream server Bulwark delivers local mail to (a "domain mail server")."""

    name: str
    host: str
    port: int = Field(default=25, ge=1, le=65535)
    domains: list[str] = Field(default_factory=list, description="Local domains this server receives mail for")
    default: bool = Field(default=False, description="Receives mail for local domains with no server of their own")
    trusted_addresses: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDR ranges this server sends from; they may send local mail without AUTH",
    )
    requires_smtp_auth: SmtpCredentials | None = Field(
        default=None, description="Credentials Bulwark logs in with when delivering to this server",
    )
    tls_pin_sha256: str | None = Field(
        default=None, pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$",
        description="SHA-256 of this server's certificate (DER, hex): required over TLS instead of a CA's signature",
    )

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [_domain(d) for d in value]

    @field_validator("trusted_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return checked_networks(value)


class Delivery(_Strict):
    retry_schedule_seconds: list[PositiveInt] = Field(
        default=[60, 300, 900, 1800, 3600, 7200, 14400],
        min_length=1,
        description="Waits between attempts after a 4xx or a connection failure; the last one repeats",
    )
    give_up_after_seconds: PositiveInt = Field(
        default=5 * 24 * 3600, description="After this long a deferred recipient bounces (a DSN to the sender)"
    )
    connect_timeout_seconds: float = Field(default=30.0, gt=0)
    smarthost: str | None = Field(
        default=None, description="host:port for mail to non-local domains; MX lookup when unset"
    )



class DynamicScreening(_Strict):
    """Dynamic Screening: ban client addresses that behave like attackers.

    Every counter runs over the same event-time window (``window_minutes``);
    crossing any limit bans the address for ``ban_minutes``. Domain mail
    servers and allow-listed addresses (when ``allow_list.skips`` names
    dynamic_screening, the default) are never banned.
    """

    enabled: bool = Field(default=True, description="Enable dynamic screening")
    failed_rcpt_limit: PositiveInt = Field(
        default=10, description="Ban IPs who cause this many failed RCPT attempts (unknown users, relay refusals)"
    )
    connection_limit: PositiveInt = Field(
        default=10, description="Ban IPs that connect more than this many times in window_minutes"
    )
    window_minutes: PositiveInt = Field(
        default=5, description="The window every counter runs over (the M of 'more than N times in M minutes')"
    )
    failed_auth_limit: PositiveInt = Field(default=3, description="Ban IPs that fail this many authentication attempts")
    rset_limit: PositiveInt = Field(default=20, description="Ban IPs that send this many RSETs")
    failed_console_login_limit: PositiveInt = Field(
        # The guide's "fail this many authentication attempts" (3), for the
        # web console's logins (the guide's HTTPS logins) as for SMTP AUTH.
        default=3, description="Ban IPs that fail this many logins to the web console"
    )
    long_session_limit: PositiveInt = Field(
        default=1,
        description="Ban IPs that hold this many sessions open as long as session_limits.max_duration_seconds",
    )
    ban_minutes: PositiveInt = Field(default=10, description="Ban IPs for this many minutes")
    close_session_after_ban: bool = Field(
        default=True, description="Close SMTP session after banning IP (421 at its next command)"
    )


class AccountHijackDetection(_Strict):
    """Account Hijack Detection: accounts may send no more than N messages in M minutes."""

    enabled: bool = Field(default=True, description="Enable account hijack detection")
    message_limit: PositiveInt = Field(default=1000, description="Accounts may send no more than this many messages")
    window_minutes: PositiveInt = Field(default=60, description="... in this many minutes")
    disable_account: bool = Field(
        default=False,
        description="Disable account when limit is reached (else further messages get 452 until the window moves on)",
    )
    include_domain_mail_servers: bool = Field(
        # On: an account hijacked on the domain's own mail server sends
        # through Bulwark without AUTH, and is just as much worth limiting.
        default=True,
        description="Include non-authenticated sessions from a domain mail server (counted by MAIL FROM)",
    )
    notify: list[str] = Field(
        default_factory=list,
        description="Administrators told when an account is disabled (default: postmaster@ the first local domain)",
    )

class OutboundTls(_Strict):
    """TLS when Bulwark delivers (the guide: "send messages with STARTTLS whenever possible")."""

    starttls: bool = Field(default=True, description="Use STARTTLS whenever the next hop offers it")
    cleartext_retry_minutes: int = Field(
        default=60, ge=0, le=24 * 60,
        description="After a failed TLS negotiation, that destination is tried without TLS for this long "
                    "(0: never); never for REQUIRETLS or MTA-STS-enforced mail",
    )


class MtaSts(_Strict):
    """MTA-STS (RFC 8461): honour other domains' policies; publish one for the local domains."""

    enabled: bool = Field(default=True, description="Look up and apply the receiving domain's MTA-STS policy")
    mode: Literal["enforce", "testing", "none"] = Field(
        # RFC 8461 section 5 suggests "testing" first, with TLS reports read, then "enforce".
        default="testing", description="Mode of the policy published for the local domains",
    )
    mx: list[str] = Field(
        default_factory=list,
        description="MX patterns of the published policy (e.g. '*.example.com'); default: the gateway's hostname",
    )
    max_age_seconds: int = Field(
        default=7 * 24 * 3600, ge=86400, le=31557600,
        description="max_age of the published policy (RFC 8461 section 3.2 allows up to a year)",
    )


class TlsReporting(_Strict):
    """SMTP TLS Reporting (RFC 8460): daily reports to the domains Bulwark delivers to."""

    enabled: bool = Field(default=True, description="Send daily TLS reports to each destination's rua")
    report_from: str | None = Field(
        default=None, description="Sender of the reports (default: postmaster@ the first local domain)"
    )


class TlsRules(_Strict):
    """Which TLS every listener accepts (SMTP and HTTPS), and how Bulwark delivers. Modern by default."""

    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        default="TLSv1.2", description="Oldest TLS version accepted; SSLv3, TLS 1.0 and 1.1 never are"
    )
    ciphers: str = Field(
        # Forward secrecy and AEAD only (Mozilla's "intermediate" profile);
        # TLS 1.3's own suites are all of that kind and always allowed.
        default="ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1",
        description="OpenSSL cipher list for TLS 1.2",
    )
    requiretls: bool = Field(default=True, description="Advertise and accept REQUIRETLS (RFC 8689) over TLS")
    outbound: OutboundTls = Field(default_factory=OutboundTls)
    mta_sts: MtaSts = Field(default_factory=MtaSts)
    tls_reporting: TlsReporting = Field(default_factory=TlsReporting)

    @field_validator("ciphers")
    @classmethod
    def _ciphers(cls, value: str) -> str:
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise ValueError(f"no cipher matches {value!r} (an OpenSSL cipher list is expected)") from None
        return value


class PasswordRules(_Strict):
    """The guide's "Use Strong Passwords": enforced whenever a password is set."""

    min_length: int = Field(default=12, ge=8, description="Fewest characters a password may have")
    min_strength: int = Field(
        default=3, ge=0, le=4, description="Lowest zxcvbn score accepted (0 weakest to 4 strongest)"
    )


class Auth(_Strict):
    passwords: PasswordRules = Field(default_factory=PasswordRules)


class ListenerRules(_Strict):
    """What one SMTP listener offers. AUTH is only ever offered over TLS."""

    auth: bool = Field(description="Offer SMTP AUTH (PLAIN, LOGIN) once the session is encrypted")
    require_auth: bool = Field(description="Refuse MAIL until the client has authenticated (RFC 6409)")


class Listeners(_Strict):
    """Behaviour per listener; where each listens is deployment (BULWARK_*_PORT)."""

    inbound: ListenerRules = Field(
        default_factory=lambda: ListenerRules(auth=False, require_auth=False),
        description="Port 25: mail from the Internet and the domain mail servers",
    )
    submission: ListenerRules = Field(
        default_factory=lambda: ListenerRules(auth=True, require_auth=True),
        description="Port 587: users' mail clients, STARTTLS then AUTH",
    )
    submissions: ListenerRules = Field(
        default_factory=lambda: ListenerRules(auth=True, require_auth=True),
        description="Port 465: users' mail clients over implicit TLS (RFC 8314)",
    )


class InlineRefusal(_Strict):
    """Waiting at the end of DATA for a verdict whose action may be "reject"."""

    enabled: bool = Field(default=True, description="Answer 550 when a reject verdict arrives in time")
    deadline_seconds: float = Field(
        default=10.0, gt=0, le=120,
        description="How long a client waits for the verdict; past it: 250, and a reject is quarantined",
    )


class QuarantineDigest(_Strict):
    """Per-user quarantine digests: each local recipient with messages held for them
    gets a list of them by email, with a signed link per message that releases
    it to them (through the web console), valid for ``link_hours``.

    Off by default: it needs the address users reach the console at. Messages
    held by one of ``never_user_releasable`` (malware, macros, an outbreak,
    data leak prevention, an unreadable message) are listed without a link:
    only an administrator releases those.
    """

    enabled: bool = Field(default=False, description="Send per-user quarantine digests")
    every_hours: PositiveInt = Field(default=24, description="A digest per recipient every this many hours, "
                                     "of the messages held in that period and still held")
    link_hours: PositiveInt = Field(default=72, description="A release link works for this many hours")
    console_url: str | None = Field(
        default=None, description="The console's address as users reach it (https://...), for the links")
    never_user_releasable: list[str] = Field(
        default_factory=lambda: ["antivirus", "macros", "outbreak", "dlp", "blobstore"],
        description="Checks whose findings only an administrator may release")

    @model_validator(mode="after")
    def _needs_url(self):
        if self.enabled and not (self.console_url or "").startswith("https://"):
            raise ValueError("console_url: digests are enabled, so they need the console's https:// address")
        return self


class Policy(_Strict):
    #: Set when the policy came from config.policy: a later Bulwark may fill
    #: in new defaults (changing the digest), yet it is still the version the
    #: administrator applied.
    _published_version: str | None = PrivateAttr(default=None)

    hostname: str = Field(description="The gateway's name in its banner, Received headers and DSNs")
    local_domains: list[str] = Field(min_length=1)
    mail_servers: list[MailServer] = Field(default_factory=list)
    max_message_bytes: PositiveInt = Field(default=50 * 1024 * 1024, description="SIZE advertised in EHLO")
    delivery: Delivery = Field(default_factory=Delivery)
    screening: DynamicScreening = Field(default_factory=DynamicScreening)
    hijack: AccountHijackDetection = Field(default_factory=AccountHijackDetection)
    quarantine_digest: QuarantineDigest = Field(default_factory=QuarantineDigest)
    checks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Settings per content check, over each check's defaults"
    )
    actions: dict[str, Action] = Field(
        default_factory=dict, description="Action per result name, over each check's default actions"
    )
    redirect_to: str | None = Field(
        default=None, description="Where messages whose verdict is 'redirect' go (e.g. a compliance mailbox)"
    )
    tag_subject_prefix: str | None = Field(
        default=None, description="Put before the Subject of tagged messages (e.g. '[SENSITIVE]'); unset: header only"
    )
    tls: TlsRules = Field(default_factory=TlsRules)
    auth: Auth = Field(default_factory=Auth)
    listeners: Listeners = Field(default_factory=Listeners)
    # The SMTP dialogue's defences (bulwark/policy/sections.py).
    inline_refusal: InlineRefusal = Field(default_factory=InlineRefusal)
    backscatter: BackscatterSettings = Field(default_factory=BackscatterSettings)
    relay_control: RelayControl = Field(default_factory=RelayControl)
    ip_shielding: IPShielding = Field(default_factory=IPShielding)
    allow_list: AllowList = Field(default_factory=AllowList)
    block_list: BlockList = Field(default_factory=BlockList)
    location_screening: LocationScreening = Field(default_factory=LocationScreening)
    session_limits: SessionLimits = Field(default_factory=SessionLimits)
    # The guide's user verification sources (bulwark/policy/verification.py).
    verification_sources: list[VerificationSource] = Field(default_factory=list)
    user_verification: UserVerification = Field(default_factory=UserVerification)
    # Outbound DKIM signing (bulwark/policy/dkim.py); keys are files, never in here.
    dkim_signing: DkimSigning = Field(default_factory=DkimSigning)
    # DMARC aggregate reports received for the local domains (bulwark/policy/dmarc.py).
    dmarc_reports: DmarcReports = Field(default_factory=DmarcReports)

    @field_validator("local_domains")
    @classmethod
    def _local_domains(cls, value: list[str]) -> list[str]:
        return [_domain(d) for d in value]

    @model_validator(mode="after")
    def _servers_serve_local_domains(self) -> "Policy":
        for server in self.mail_servers:
            for domain in server.domains:
                if domain not in self.local_domains:
                    raise ValueError(
                        f"mail server {server.name!r} lists {domain!r}, which is not in local_domains"
                    )
        return self

    @model_validator(mode="after")
    def _verification_sources_exist(self) -> "Policy":
        check_verification(self)
        return self

    # -- questions the pipeline asks ------------------------------------

    @property
    def version(self) -> str:
        """The version verdicts and refusals record: the one it was published
        under, else the digest of its content."""
        return self._published_version or self.digest

    @cached_property
    def digest(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.local_domains

    def servers_for_domain(self, domain: str) -> list[MailServer]:
        """The domain's own mail servers, else the default ones (the guide's fallback)."""
        domain = domain.lower()
        own = [s for s in self.mail_servers if domain in s.domains]
        return own or [s for s in self.mail_servers if s.default]

    def is_domain_mail_server(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(net, strict=False)
            for server in self.mail_servers
            for net in server.trusted_addresses
        )


class PolicyError(ValueError):
    """An invalid policy: file, line, field and what was expected."""

    def __init__(self, path: Path | str, problems: list[tuple[int | None, str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [
            f"{self.path}:{line if line is not None else '?'}: {field or '(top level)'}: {message}"
            for line, field, message in problems
        ]
        super().__init__("invalid policy\n" + "\n".join(lines))


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at a pydantic error location."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _unconstructable_line(root: yaml.Node | None) -> int | None:
    """1-based line of the first scalar PyYAML cannot construct (a date that does not exist)."""
    constructor = yaml.constructor.SafeConstructor()
    pending, seen = [root], set()
    while pending:
        node = pending.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                constructor.construct_object(node)
            except Exception:
                return node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            pending.extend(part for pair in node.value for part in pair)
    return None


def parse(text: str, path: Path | str = "<policy>") -> Policy:
    root = None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # PyYAML marks where it noticed the problem; the context mark (where
        # the unfinished construct began) is usually where the mistake is.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        what = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
        raise PolicyError(path, [(mark.line + 1 if mark else None, "", f"not valid YAML: {what}")]) from None
    except RecursionError:
        raise PolicyError(path, [(None, "", "not valid YAML: nested too deeply")]) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML lets a date that does not exist (2001-13-01) through as
        # datetime's own error, with no mark: find the scalar it came from.
        raise PolicyError(path, [(_unconstructable_line(root), "", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise PolicyError(path, [(1, "", "expected a mapping of policy sections")])
    return _validate(data, root, path)


def from_document(document: dict, source: str, version: str | None = None) -> Policy:
    """A published policy document (JSON), validated exactly as a file is."""
    if not isinstance(document, dict):
        raise PolicyError(source, [(None, "", "expected a mapping of policy sections")])
    policy = _validate(document, None, source)
    if version:
        policy._published_version = version
    return policy


def _validate(data: dict, root: yaml.Node | None, path: Path | str) -> Policy:
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc)
            problems.append((_line_of(root, loc), field, err["msg"].removeprefix("Value error, ")))
        raise PolicyError(path, problems) from None

    # Check settings are validated by the checks themselves, so a typo in a
    # threshold is caught here and not when the first message arrives.
    from streams.checks import validate_settings

    problems = [
        (_line_of(root, ("checks", *loc)), ".".join(str(p) for p in ("checks", *loc)), msg)
        for loc, msg in validate_settings(policy)
    ]
    # Allow-listing a local address or domain is refused, with the guide's reason.
    problems += [
        (_line_of(root, loc), ".".join(str(p) for p in loc), msg)
        for loc, msg in allow_list_problems(policy.allow_list, policy.local_domains)
    ]
    problems += [(_line_of(root, loc), ".".join(str(p) for p in loc), msg) for loc, msg in dkim_problems(policy)]
    problems += [(_line_of(root, loc), ".".join(str(p) for p in loc), msg)
                 for loc, msg in dmarc_report_problems(policy)]
    if problems:
        raise PolicyError(path, problems)
    return policy


def load(path: Path | str) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(path, [(None, "", f"cannot read the policy file: {exc.strerror}")]) from None
    return parse(text, path)

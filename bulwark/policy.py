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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

Action = Literal["deliver", "quarantine", "reject", "redirect"]


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

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [_domain(d) for d in value]

    @field_validator("trusted_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
        return value


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


class Policy(_Strict):
    hostname: str = Field(description="The gateway's name in its banner, Received headers and DSNs")
    local_domains: list[str] = Field(min_length=1)
    mail_servers: list[MailServer] = Field(default_factory=list)
    max_message_bytes: PositiveInt = Field(default=50 * 1024 * 1024, description="SIZE advertised in EHLO")
    delivery: Delivery = Field(default_factory=Delivery)
    checks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Settings per content check, over each check's defaults"
    )
    actions: dict[str, Action] = Field(
        default_factory=dict, description="Action per result name, over each check's default actions"
    )
    redirect_to: str | None = Field(
        default=None, description="Where messages whose verdict is 'redirect' go (e.g. a compliance mailbox)"
    )

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

    # -- questions the pipeline asks ------------------------------------

    @property
    def version(self) -> str:
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


def parse(text: str, path: Path | str = "<policy>") -> Policy:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # PyYAML marks where it noticed the problem; the context mark (where
        # the unfinished construct began) is usually where the mistake is.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        what = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
        raise PolicyError(path, [(mark.line + 1 if mark else None, "", f"not valid YAML: {what}")]) from None
    if not isinstance(data, dict):
        raise PolicyError(path, [(1, "", "expected a mapping of policy sections")])
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

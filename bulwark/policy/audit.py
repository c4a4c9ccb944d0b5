"""`bulwark policy audit`: the policy scored against the best-practice guide.

One finding per recommendation of ``reference/securitygateway-best-practices.txt``,
in the guide's order: met or not, why, and what to change. The command exits
non-zero when any is not met, so it can gate a deployment.

Every rule reads the policy's own settings (the Policy model and each
content check's ``Settings``), never a name that might not exist: a renamed
setting breaks the audit's tests rather than passing silently.

A finding that is not met carries its change twice: ``change``, the sentence
for a person, and ``fix``, a mapping to deep-merge into the policy file
(:func:`merge`: mappings merge key by key, a list or a value replaces). The
text output prints the fix as the YAML an administrator would write. Where
the fix needs something only the administrator knows (a directory server, a
mail server, a country database, the countries to refuse), it is a concrete
example that validates, and ``change`` says to put in their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from bulwark.policy import Policy
from bulwark.policy.sections import ALLOW_LOCAL_REASON, DEFAULT_SHIELD_PAIRS, is_local_address

#: The guide's one hour of retrying a destination without TLS after a failed negotiation.
CLEARTEXT_RETRY_MINUTES = 60
#: Where geoipupdate writes the country database on Debian; only an example for the fix.
EXAMPLE_COUNTRY_DATABASE = "/var/lib/GeoIP/GeoLite2-Country.mmdb"
#: ISO 3166-1 leaves XX to users: a valid code no country has, to be replaced.
EXAMPLE_COUNTRY = "XX"
#: Actions that never deliver the message.
HELD = ("reject", "quarantine")


@dataclass(frozen=True)
class Finding:
    recommendation: str
    met: bool
    why: str
    change: str = ""
    #: Deep-merged into the policy file, this meets the recommendation.
    fix: dict[str, Any] = field(default_factory=dict, hash=False)


def merge(document: dict, fix: dict) -> dict:
    """A copy of ``document`` with ``fix`` merged in: mappings merge, anything else replaces."""
    out = dict(document)
    for key, value in fix.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_fixes(document: dict, findings: list[Finding]) -> dict:
    """The policy document with the fix of every finding that is not met."""
    for f in findings:
        if not f.met:
            document = merge(document, f.fix)
    return document


def _at(path: str, value: Any) -> dict:
    """{"a": {"b": value}} for "a.b" (setting names never contain dots)."""
    for name in reversed(path.split(".")):
        value = {name: value}
    return value


class _Rule:
    """The problems one rule finds, each with its why, its change and its fix."""

    def __init__(self, title: str):
        self.title = title
        self.whys: list[str] = []
        self.changes: list[str] = []
        self.fix: dict = {}

    def problem(self, why: str, change: str, fix: dict) -> None:
        self.whys.append(why)
        self.changes.append(change)
        self.fix = merge(self.fix, fix)

    def finding(self, met_why: str) -> Finding:
        if self.whys:
            return Finding(self.title, False, "; ".join(self.whys), "; ".join(self.changes), self.fix)
        return Finding(self.title, True, met_why)


Rule = Callable[[Policy], Finding]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _check(name: str):
    """The content check and its module (KeyError if this Bulwark has none of that name)."""
    from streams.checks import CHECKS

    return CHECKS[name]


def _action(policy: Policy, check, result: str) -> str:
    """What a hit of ``result`` does under this policy (as streams.verdict decides it)."""
    return policy.actions.get(result) or check.actions(policy).get(result) or "deliver"


def _dump(model) -> dict:
    """A list item as the administrator wrote it (only the keys that were given)."""
    return model.model_dump(mode="json", exclude_unset=True)


@rule
def user_verification(policy: Policy) -> Finding:
    r = _Rule("Verify that a user is valid before creating an account (a default user verification source)")
    sources = policy.verification_sources
    if not sources:
        domain = policy.local_domains[0]
        example = {"name": "directory", "type": "ldap", "url": f"ldaps://ldap.{domain}",
                   "base_dn": ",".join(f"dc={part}" for part in domain.split(".")), "default": True}
        r.problem("no user verification source is defined",
                  "add a verification source marked default: true; this LDAP directory is an example: put in "
                  "your own (LDAP, Active Directory, Microsoft 365, SMTP call-forward or Minger), its address "
                  "and base DN", {"verification_sources": [example]})
    elif not any(s.default for s in sources):
        listed = [_dump(s) for s in sources]
        listed[0]["default"] = True
        r.problem("no user verification source is a default one (a domain without sources of its own verifies "
                  "no recipient)", f"mark a source default: true (here {sources[0].name}, the first)",
                  {"verification_sources": listed})
    defaults = [s.name for s in sources if s.default]
    return r.finding(f"default user verification source(s): {', '.join(defaults)}")


@rule
def smtp_auth_required(policy: Policy) -> Finding:
    r = _Rule("Require SMTP authentication unless a message comes from a domain mail server")
    if not policy.relay_control.only_domain_mail_servers_send_local_mail:
        r.problem("relay_control.only_domain_mail_servers_send_local_mail is off: anyone may send mail from a "
                  "local domain without AUTH", "accept local senders without AUTH only from domain mail servers",
                  _at("relay_control.only_domain_mail_servers_send_local_mail", True))
    for name in ("submission", "submissions"):
        if not getattr(policy.listeners, name).require_auth:
            r.problem(f"the {name} listener accepts mail without AUTH",
                      f"offer and require AUTH on the {name} listener",
                      _at(f"listeners.{name}", {"auth": True, "require_auth": True}))
    return r.finding("local mail without AUTH only from domain mail servers; submission requires AUTH")


@rule
def strong_passwords(policy: Policy) -> Finding:
    r = _Rule("Use strong passwords")
    rules = policy.auth.passwords
    if rules.min_length < 12:
        r.problem(f"passwords may be {rules.min_length} characters", "require at least 12 characters",
                  _at("auth.passwords.min_length", 12))
    if rules.min_strength < 3:
        r.problem(f"passwords of zxcvbn strength {rules.min_strength} are accepted",
                  "require strength 3 or more", _at("auth.passwords.min_strength", 3))
    return r.finding(f"at least {rules.min_length} characters, strength {rules.min_strength}")


@rule
def dynamic_screening(policy: Policy) -> Finding:
    r = _Rule("Enable Dynamic Screening")
    if not policy.screening.enabled:
        r.problem("Dynamic Screening is off", "turn Dynamic Screening on", _at("screening.enabled", True))
    return r.finding("Dynamic Screening is on")


@rule
def account_hijack_detection(policy: Policy) -> Finding:
    r = _Rule("Enable Account Hijack Detection")
    hijack = policy.hijack
    if not hijack.enabled:
        r.problem("Account Hijack Detection is off", "turn Account Hijack Detection on",
                  _at("hijack.enabled", True))
    if not hijack.disable_account:
        r.problem("a hijacked account is throttled but not disabled when it reaches the limit",
                  "disable the account at the limit (the guide: the account is disabled and the administrator "
                  "notified)", _at("hijack.disable_account", True))
    return r.finding(f"accounts may send {hijack.message_limit} messages in {hijack.window_minutes} minutes, "
                     "then are disabled")


@rule
def default_mail_server(policy: Policy) -> Finding:
    r = _Rule("Enable at least one default mail server")
    servers = policy.mail_servers
    if not servers:
        example = {"name": "mail", "host": f"mail.{policy.local_domains[0]}", "default": True}
        r.problem("no mail server is defined: mail for the local domains cannot be delivered",
                  "add a mail server marked default: true; this host is an example: put in your own mail "
                  "server (and its trusted_addresses)", {"mail_servers": [example]})
    elif not any(s.default for s in servers):
        listed = [_dump(s) for s in servers]
        listed[0]["default"] = True
        r.problem("no mail server is marked default: mail for a local domain without its own server cannot be "
                  "delivered", f"mark a mail server default: true (here {servers[0].name}, the first)",
                  {"mail_servers": listed})
    return r.finding(f"default mail server(s): {', '.join(s.name for s in servers if s.default)}")


@rule
def relay_control(policy: Policy) -> Finding:
    r = _Rule("Prevent unauthorized mail relaying (only the two recommended settings, no exceptions)")
    relay = policy.relay_control
    if not relay.only_domain_mail_servers_send_local_mail:
        r.problem("'Only domain mail servers can send local mail' is off", "turn it on",
                  _at("relay_control.only_domain_mail_servers_send_local_mail", True))
    if not relay.local_sender_must_exist:
        r.problem("'SMTP MAIL address must exist if it uses a local domain' is off", "turn it on",
                  _at("relay_control.local_sender_must_exist", True))
    for name in relay.exceptions.enabled():
        off = [] if name == "relay_for_addresses" else False
        r.problem(f"relay exception {name} is enabled (the guide recommends none)", f"remove {name}",
                  _at(f"relay_control.exceptions.{name}", off))
    return r.finding("relaying closed; both recommended settings on; no exceptions")


@rule
def ip_shielding(policy: Policy) -> Finding:
    r = _Rule("Protect your domain with IP Shielding")
    shield = policy.ip_shielding
    if not shield.enabled:
        r.problem("IP Shielding is off", "turn IP Shielding on", _at("ip_shielding.enabled", True))
    if not shield.pairs:
        r.problem("IP Shielding has no domain/IP pairs",
                  "add domain/IP pairs: these are the guide's (every local domain from the private ranges "
                  "and loopback); add your own networks",
                  _at("ip_shielding.pairs", [{"domain": p.domain, "ip": p.ip} for p in DEFAULT_SHIELD_PAIRS]))
    if not shield.check_from_header:
        r.problem("the From header is not checked against the IP Shield pairs", "check the From header too",
                  _at("ip_shielding.check_from_header", True))
    return r.finding(f"{len(shield.pairs)} domain/IP pairs; the From header is checked too")


@rule
def tls(policy: Policy) -> Finding:
    # SMTP and HTTPS listeners always offer TLS (a self-signed certificate
    # when the deployment gives none), so there is no switch to check.
    r = _Rule("Enable TLS for SMTP and HTTP (STARTTLS, REQUIRETLS, MTA-STS, TLS reporting)")
    rules = policy.tls
    if not rules.outbound.starttls:
        r.problem("mail is sent without STARTTLS even when the next hop offers it",
                  "send with STARTTLS whenever possible", _at("tls.outbound.starttls", True))
    minutes = rules.outbound.cleartext_retry_minutes
    if not 0 < minutes <= CLEARTEXT_RETRY_MINUTES:
        now = "never" if minutes == 0 else f"for {minutes} minutes"
        r.problem(f"after a failed TLS negotiation a destination is {now} retried without TLS (the guide: for "
                  f"up to one hour)", "retry without TLS for up to one hour",
                  _at("tls.outbound.cleartext_retry_minutes", CLEARTEXT_RETRY_MINUTES))
    if not rules.requiretls:
        r.problem("REQUIRETLS (RFC 8689) is off", "enable REQUIRETLS", _at("tls.requiretls", True))
    if not rules.mta_sts.enabled:
        r.problem("MTA-STS (RFC 8461) is off", "enable MTA-STS", _at("tls.mta_sts.enabled", True))
    if not rules.tls_reporting.enabled:
        r.problem("TLS Reporting (RFC 8460) is off", "enable TLS Reporting", _at("tls.tls_reporting.enabled", True))
    return r.finding(f"TLS ({rules.min_version} or newer) on every listener; STARTTLS outbound, retried without "
                     f"TLS for up to {minutes} minutes; REQUIRETLS, MTA-STS (published policy in "
                     f"{rules.mta_sts.mode} mode) and TLS Reporting on")


@rule
def backscatter(policy: Policy) -> Finding:
    r = _Rule("Enable Backscatter Protection (and reject what fails it)")
    section = policy.backscatter
    if not section.enabled:
        r.problem("Backscatter Protection is off", "turn Backscatter Protection on",
                  _at("backscatter.enabled", True))
    if not section.reject:
        r.problem("invalid returned messages are logged but accepted", "reject them",
                  _at("backscatter.reject", True))
    return r.finding("Backscatter Protection is on and rejects invalid returned mail")


@rule
def no_local_allow_list(policy: Policy) -> Finding:
    # The policy's validation refuses these, so only a policy built without
    # it (a published document from an older Bulwark) can fail this rule.
    r = _Rule("Don't allow-list local email addresses")
    allow, local_domains = policy.allow_list, policy.local_domains
    senders = [s for s in allow.senders if is_local_address(s, local_domains)]
    domains = [d for d in allow.domains if d in local_domains]
    if senders or domains:
        fix = {}
        if senders:
            fix["senders"] = [s for s in allow.senders if s not in senders]
        if domains:
            fix["domains"] = [d for d in allow.domains if d not in domains]
        r.problem(f"{', '.join(senders + domains)} on the allow list: {ALLOW_LOCAL_REASON}",
                  "remove them from the allow list", {"allow_list": fix})
    return r.finding("no local address or domain is on the allow list")


@rule
def malware(policy: Policy) -> Finding:
    from streams.checks import antivirus

    r = _Rule("Protect your email infrastructure from malware (scan; refuse or quarantine; quarantine unscannable)")
    check = _check(antivirus.NAME)
    settings = check.settings(policy)
    if not settings.enabled:
        r.problem("virus scanning (checks.antivirus) is off", "turn virus scanning on",
                  _at("checks.antivirus.enabled", True))
    infected = _action(policy, check, antivirus.VIRUS_FOUND)
    if infected not in HELD:
        r.problem(f"an infected message gets '{infected}'", "refuse infected messages (or quarantine them)",
                  {"actions": {antivirus.VIRUS_FOUND: antivirus.WHEN_INFECTED[settings.when_infected]}})
    for result in (antivirus.UNSCANNABLE, antivirus.FAIL):
        action = _action(policy, check, result)
        if action not in HELD:
            r.problem(f"a message that cannot be scanned ({result}) gets '{action}'",
                      f"quarantine {result}", {"actions": {result: "quarantine"}})
    return r.finding(f"virus scanning is on; infected: {infected}; unscannable: "
                     f"{_action(policy, check, antivirus.UNSCANNABLE)}")


@rule
def outbreak(policy: Policy) -> Finding:
    from streams.checks import outbreak as module

    r = _Rule("Use Outbreak Protection")
    check = _check(module.NAME)
    if not check.settings(policy).enabled:
        r.problem("Outbreak Protection (checks.outbreak) is off", "turn Outbreak Protection on",
                  _at("checks.outbreak.enabled", True))
    action = _action(policy, check, module.FOUND)
    if action == "deliver":
        r.problem(f"a message in an outbreak ({module.FOUND}) is delivered as if clean",
                  f"quarantine {module.FOUND}", {"actions": {module.FOUND: "quarantine"}})
    return r.finding(f"Outbreak Protection is on; {module.FOUND}: {action}")


@rule
def data_leaks(policy: Policy) -> Finding:
    from streams.checks import dlp

    r = _Rule("Prevent data leaks (Data Leak Prevention rules)")
    settings = _check(dlp.NAME).settings(policy)
    if not settings.enabled:
        r.problem("Data Leak Prevention (checks.dlp) is off",
                  "turn Data Leak Prevention on, then keep the rules your business needs",
                  _at("checks.dlp.enabled", True))
    active = settings.active(None)
    if not active:
        reenable = {name: {"enabled": True} for name, own in settings.rules.items() if own.enabled is False}
        fix = {"disabled_categories": []}
        if reenable:
            fix["rules"] = reenable
        r.problem("every Data Leak Prevention rule is switched off",
                  "switch the rules back on, then off again only those your business does not need",
                  _at("checks.dlp", fix))
    return r.finding(f"Data Leak Prevention is on with {len(active)} rules")


@rule
def location_screening(policy: Policy) -> Finding:
    r = _Rule("Enable Location Screening to block connections from unauthorized regions")
    screen = policy.location_screening
    if not screen.enabled:
        fix = {"enabled": True}
        if screen.database is None:
            fix["database"] = EXAMPLE_COUNTRY_DATABASE
            change = ("turn Location Screening on with a country database (a MaxMind-format .mmdb; the path "
                      "is where geoipupdate writes it: put in yours, it must exist)")
        else:
            change = f"turn Location Screening on (its database {screen.database} must exist)"
        r.problem("Location Screening is off", change, _at("location_screening", fix))
    if not (screen.refuse_connections_from or screen.refuse_auth_from):
        r.problem("Location Screening refuses no country",
                  f"refuse connections (or AUTH) from the countries you have no business with; {EXAMPLE_COUNTRY} "
                  "is a placeholder that matches no country: put in their ISO codes",
                  _at("location_screening.refuse_connections_from", [EXAMPLE_COUNTRY]))
    return r.finding(f"refusing connections from {', '.join(screen.refuse_connections_from) or 'none'}, "
                     f"AUTH from {', '.join(screen.refuse_auth_from) or 'none'}")


@rule
def macro_detection(policy: Policy) -> Finding:
    from streams.checks import macros

    r = _Rule("Enable macro detection in Microsoft Office documents")
    check = _check(macros.NAME)
    settings = check.settings(policy)
    if not settings.enabled:
        r.problem("macro detection (checks.macros) is off", "turn macro detection on",
                  _at("checks.macros.enabled", True))
    action = _action(policy, check, macros.FOUND)
    if action not in HELD:
        r.problem(f"a document with macros ({macros.FOUND}) gets '{action}'",
                  "refuse messages with macros (or quarantine them)",
                  {"actions": {macros.FOUND: macros.WHEN_FOUND[settings.when_found]}})
    return r.finding(f"Office macros are detected; {macros.FOUND}: {action}")


@rule
def sender_authentication(policy: Policy) -> Finding:
    # Not in the guide, which predates DMARC's wide use; the large mailbox
    # providers now expect it of every receiver (issue 14).
    from streams.checks import dmarc, local_spoofing
    from streams.checks._sender_auth import ACTION

    r = _Rule("Authenticate senders (SPF, DKIM, DMARC, ARC) and refuse spoofed local domains")
    for name in ("spf", "dkim", "dmarc", "local_spoofing"):
        if not _check(name).settings(policy).enabled:
            r.problem(f"checks.{name} is off", f"turn the {name} check on", _at(f"checks.{name}.enabled", True))
    wanted = [
        (dmarc, dmarc.FAIL_REJECT, "when_reject", "refuse", "mail failing DMARC under its domain's p=reject"),
        (dmarc, dmarc.FAIL_QUARANTINE, "when_quarantine", "quarantine",
         "mail failing DMARC under its domain's p=quarantine"),
        (local_spoofing, local_spoofing.SPOOFED, "when_spoofed", "refuse",
         "Internet mail forging a local domain in its From:"),
        (local_spoofing, local_spoofing.UNVERIFIED, None, "quarantine",
         "Internet mail with a local From: whose DMARC record could not be read"),
    ]
    actions = {}
    for module, result, setting, secure, what in wanted:
        action = actions[result] = _action(policy, _check(module.NAME), result)
        if action in HELD:
            continue
        # Changed where it was changed: an actions: entry, or the check's setting.
        fix = ({"actions": {result: ACTION[secure]}} if result in policy.actions or setting is None
               else _at(f"checks.{module.NAME}.{setting}", secure))
        r.problem(f"{what} ({result}) gets '{action}'", f"{secure} it", fix)
    forwarders = _check("arc").settings(policy).trusted_forwarders
    people = _check("impersonation").settings(policy).people
    return r.finding(f"SPF, DKIM, DMARC and ARC checked; p=reject failures: {actions[dmarc.FAIL_REJECT]}, "
                     f"p=quarantine failures: {actions[dmarc.FAIL_QUARANTINE]}; spoofed local domains: "
                     f"{actions[local_spoofing.SPOOFED]}; {len(forwarders)} trusted forwarder(s); "
                     f"{len(people)} people protected from display-name impersonation")


def audit(policy: Policy) -> list[Finding]:
    return [check(policy) for check in RULES]


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key, as the policy files are written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def as_yaml(fix: dict) -> str:
    return yaml.dump(fix, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{'met' if f.met else 'NOT MET'}] {f.recommendation}")
        lines.append(f"    why: {f.why}")
        if not f.met:
            lines.append(f"    change: {f.change}")
            lines.extend(f"        {line}" for line in as_yaml(f.fix).splitlines())
    met = sum(f.met for f in findings)
    lines.append(f"{met} of {len(findings)} recommendations met")
    return "\n".join(lines)

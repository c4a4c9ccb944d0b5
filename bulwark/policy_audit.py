"""`bulwark policy audit`: the policy scored against the best-practice guide.

One finding per recommendation of ``reference/securitygateway-best-practices.txt``,
in the guide's order: met or not, why, and what to change. A recommendation
that needs a feature this Bulwark's policy does not have yet is "not met",
never silently passed. The command exits non-zero when any is not met, so it
can gate a deployment.

Sections that other parts of Bulwark add to the policy are read with
``getattr``: the audit keeps working while those sections grow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bulwark.policy import Policy
from bulwark.policy_sections import ALLOW_LOCAL_REASON, is_local_address


@dataclass(frozen=True)
class Finding:
    recommendation: str
    met: bool
    why: str
    change: str = ""


Rule = Callable[[Policy], Finding]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _section(policy: Policy, *path: str):
    node = policy
    for name in path:
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def _check(policy: Policy, *names: str) -> tuple[str | None, dict]:
    """(name, effective settings) of the first content check present, else (None, {})."""
    from streams.checks import CHECKS

    for name in names:
        check = CHECKS.get(name)
        if check is not None:
            return name, check.settings(policy).model_dump()
    return None, {}


@rule
def user_verification(policy: Policy) -> Finding:
    title = "Verify that a user is valid before creating an account (a default user verification source)"
    sources = _section(policy, "verification_sources")
    if sources is None:
        return Finding(title, False, "this policy has no verification_sources section",
                       "add verification_sources with at least one source marked default: true")
    items = list(sources.values()) if isinstance(sources, dict) else list(sources)
    if not items:
        return Finding(title, False, "no user verification source is defined",
                       "add a verification source (LDAP, Active Directory, SMTP call-forward...) with default: true")
    defaults = [s for s in items if getattr(s, "default", False)]
    if not defaults:
        return Finding(title, False, "no user verification source is a default one",
                       "mark one verification source default: true (used for domains without their own)")
    return Finding(title, True, f"{len(defaults)} default user verification source(s)")


@rule
def smtp_auth_required(policy: Policy) -> Finding:
    title = "Require SMTP authentication unless a message comes from a domain mail server"
    relay = policy.relay_control
    if not relay.only_domain_mail_servers_send_local_mail:
        return Finding(title, False, "relay_control.only_domain_mail_servers_send_local_mail is off: anyone may "
                       "send mail from a local domain without AUTH",
                       "set relay_control.only_domain_mail_servers_send_local_mail: true")
    listeners = _section(policy, "listeners")
    if listeners is not None:
        lax = [name for name in ("submission", "submissions")
               if getattr(listeners, name, None) is not None and not getattr(listeners, name).require_auth]
        if lax:
            return Finding(title, False, f"the {', '.join(lax)} listener(s) accept mail without AUTH",
                           f"set listeners.{lax[0]}.require_auth: true")
    return Finding(title, True, "local mail without AUTH only from domain mail servers; submission requires AUTH")


@rule
def strong_passwords(policy: Policy) -> Finding:
    title = "Use strong passwords"
    rules = _section(policy, "auth", "passwords")
    if rules is None:
        return Finding(title, False, "this policy has no auth.passwords rules",
                       "add auth.passwords with min_length and min_strength")
    if rules.min_length < 12 or getattr(rules, "min_strength", 3) < 3:
        return Finding(title, False, f"passwords may be {rules.min_length} characters, strength "
                       f"{getattr(rules, 'min_strength', '?')}",
                       "set auth.passwords.min_length: 12 (or more) and min_strength: 3 (or more)")
    return Finding(title, True, f"at least {rules.min_length} characters, strength {rules.min_strength}")


@rule
def dynamic_screening(policy: Policy) -> Finding:
    title = "Enable Dynamic Screening"
    screening = _section(policy, "screening")
    if screening is None or not getattr(screening, "enabled", False):
        return Finding(title, False, "Dynamic Screening is off", "set screening.enabled: true")
    return Finding(title, True, "Dynamic Screening is on")


@rule
def account_hijack_detection(policy: Policy) -> Finding:
    title = "Enable Account Hijack Detection"
    hijack = _section(policy, "hijack")
    if hijack is None or not getattr(hijack, "enabled", False):
        return Finding(title, False, "Account Hijack Detection is off", "set hijack.enabled: true")
    if not getattr(hijack, "disable_account", False):
        return Finding(title, False, "a hijacked account is throttled but not disabled when it reaches the limit",
                       "set hijack.disable_account: true (the guide: the account is disabled and the "
                       "administrator notified)")
    return Finding(title, True, f"accounts may send {hijack.message_limit} messages in {hijack.window_minutes} "
                   "minutes, then are disabled")


@rule
def default_mail_server(policy: Policy) -> Finding:
    title = "Enable at least one default mail server"
    defaults = [s.name for s in policy.mail_servers if s.default]
    if not defaults:
        return Finding(title, False, "no mail server is marked default: mail for a local domain without its own "
                       "server cannot be delivered", "mark one of mail_servers default: true")
    return Finding(title, True, f"default mail server(s): {', '.join(defaults)}")


@rule
def relay_control(policy: Policy) -> Finding:
    title = "Prevent unauthorized mail relaying (only the two recommended settings, no exceptions)"
    relay = policy.relay_control
    problems, changes = [], []
    if not relay.only_domain_mail_servers_send_local_mail:
        problems.append("'Only domain mail servers can send local mail' is off")
        changes.append("relay_control.only_domain_mail_servers_send_local_mail: true")
    if not relay.local_sender_must_exist:
        problems.append("'SMTP MAIL address must exist if it uses a local domain' is off")
        changes.append("relay_control.local_sender_must_exist: true")
    for name in relay.exceptions.enabled():
        problems.append(f"relay exception {name} is enabled (the guide recommends none)")
        changes.append(f"remove relay_control.exceptions.{name}")
    if problems:
        return Finding(title, False, "; ".join(problems), "; ".join(changes))
    return Finding(title, True, "relaying closed; both recommended settings on; no exceptions")


@rule
def ip_shielding(policy: Policy) -> Finding:
    title = "Protect your domain with IP Shielding"
    shield = policy.ip_shielding
    if not shield.enabled:
        return Finding(title, False, "IP Shielding is off", "set ip_shielding.enabled: true")
    if not shield.pairs:
        return Finding(title, False, "IP Shielding has no domain/IP pairs", "add ip_shielding.pairs")
    if not shield.check_from_header:
        return Finding(title, False, "the From header is not checked against the IP Shield pairs",
                       "set ip_shielding.check_from_header: true")
    return Finding(title, True, f"{len(shield.pairs)} domain/IP pairs; the From header is checked too")


@rule
def tls(policy: Policy) -> Finding:
    title = "Enable TLS for SMTP and HTTP (STARTTLS, REQUIRETLS, MTA-STS, TLS reporting)"
    rules = _section(policy, "tls")
    if rules is None:
        return Finding(title, False, "this policy has no tls section", "add a tls section")
    missing = [name for name in ("requiretls", "mta_sts", "tls_reporting")
               if not getattr(rules, name, False)]
    if getattr(rules, "enabled", True) is False:
        return Finding(title, False, "TLS is off", "set tls.enabled: true")
    if missing:
        return Finding(title, False, f"not enabled (or not available in this policy): {', '.join(missing)}",
                       "; ".join(f"set tls.{m}: true" for m in missing))
    return Finding(title, True, "TLS, REQUIRETLS, MTA-STS and TLS reporting enabled")


@rule
def backscatter(policy: Policy) -> Finding:
    title = "Enable Backscatter Protection (and reject what fails it)"
    section = _section(policy, "backscatter")
    if section is None:
        return Finding(title, False, "this policy has no backscatter section", "add backscatter.enabled: true")
    if not getattr(section, "enabled", False):
        return Finding(title, False, "Backscatter Protection is off", "set backscatter.enabled: true")
    if not getattr(section, "reject", True):
        return Finding(title, False, "invalid returned messages are logged but accepted",
                       "set backscatter.reject: true")
    return Finding(title, True, "Backscatter Protection is on")


@rule
def no_local_allow_list(policy: Policy) -> Finding:
    title = "Don't allow-list local email addresses"
    allow = policy.allow_list
    local = [s for s in allow.senders if is_local_address(s, policy.local_domains)]
    local += [d for d in allow.domains if d in policy.local_domains]
    if local:
        return Finding(title, False, f"{', '.join(local)} on the allow list: {ALLOW_LOCAL_REASON}",
                       "remove them from allow_list")
    return Finding(title, True, "no local address or domain is on the allow list")


@rule
def malware(policy: Policy) -> Finding:
    title = "Protect your email infrastructure from malware (scan; refuse or quarantine; quarantine unscannable)"
    name, settings = _check(policy, "antivirus", "virus", "clamav")
    if name is None:
        return Finding(title, False, "this Bulwark has no antivirus check", "install the antivirus check")
    if not settings.get("enabled", False):
        return Finding(title, False, f"the {name} check is off", f"set checks.{name}.enabled: true")
    return Finding(title, True, f"the {name} check is on")


@rule
def outbreak(policy: Policy) -> Finding:
    title = "Use Outbreak Protection"
    name, settings = _check(policy, "outbreak")
    if name is None or not settings.get("enabled", False):
        return Finding(title, False, "Outbreak Protection is not enabled (or not available)",
                       "enable checks.outbreak")
    return Finding(title, True, "Outbreak Protection is on")


@rule
def data_leaks(policy: Policy) -> Finding:
    title = "Prevent data leaks (Data Leak Prevention rules)"
    name, settings = _check(policy, "dlp")
    if name is None or not settings.get("enabled", False):
        return Finding(title, False, "Data Leak Prevention is not enabled (or not available)",
                       "set checks.dlp.enabled: true with the rules your business needs")
    return Finding(title, True, "Data Leak Prevention is on")


@rule
def location_screening(policy: Policy) -> Finding:
    title = "Enable Location Screening to block connections from unauthorized regions"
    screen = policy.location_screening
    if not screen.enabled:
        return Finding(title, False, "Location Screening is off",
                       "set location_screening.enabled: true, its database, and refuse_connections_from "
                       "(or refuse_auth_from) the countries you have no business with")
    if not (screen.refuse_connections_from or screen.refuse_auth_from):
        return Finding(title, False, "Location Screening is on but refuses no country",
                       "list countries in location_screening.refuse_connections_from or refuse_auth_from")
    return Finding(title, True, f"refusing connections from {', '.join(screen.refuse_connections_from) or 'none'}, "
                   f"AUTH from {', '.join(screen.refuse_auth_from) or 'none'}")


@rule
def macro_detection(policy: Policy) -> Finding:
    title = "Enable macro detection in Microsoft Office documents"
    name, settings = _check(policy, "antivirus", "virus", "macros", "macro")
    if name is None:
        return Finding(title, False, "this Bulwark has no macro detection", "install the antivirus check")
    if not settings.get("enabled", False) or not settings.get("detect_macros", name.startswith("macro")):
        return Finding(title, False, f"macro detection is off in checks.{name}",
                       f"set checks.{name}.detect_macros: true")
    return Finding(title, True, "Office macros are flagged")


def audit(policy: Policy) -> list[Finding]:
    return [check(policy) for check in RULES]


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{'met' if f.met else 'NOT MET'}] {f.recommendation}")
        lines.append(f"    why: {f.why}")
        if not f.met and f.change:
            lines.append(f"    change: {f.change}")
    met = sum(f.met for f in findings)
    lines.append(f"{met} of {len(findings)} recommendations met")
    return "\n".join(lines)

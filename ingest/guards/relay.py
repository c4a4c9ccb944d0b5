"""Relay control: accept a message only when it is from or to a local domain.

Following the guide's two recommended settings and none of the exceptions:

- at RCPT, mail to a non-local domain only from an authenticated session or
  a domain mail server (relaying closed);
- at MAIL, "only domain mail servers can send local mail": a sender in a
  local domain without AUTH must come from that domain's mail server;
- at MAIL, "SMTP MAIL address must exist if it uses a local domain".

A local sender exists when Bulwark has its account, or else when the
domain's user verification sources say so, asked exactly as RCPT asks them
(``ingest.verification``, the same Verifier and cache): "invalid" is
550 5.1.0, "no source could answer" is 451 4.4.3 so the domain's server
retries. A domain with no sources has nothing that could vouch for a
sender: its own mail servers' addresses are trusted to send as anyone of
the domain (they are the organisation's servers, and relay control already
lets them send at all); any other client still needs a known account.

The decision rests on the client's address and its authentication, never on
the sender address it claims. Addresses that try to smuggle a relay through a
local domain (percent hack, bang paths, source routes, quoted local parts
containing @, several @, address literals) are refused at RCPT with a 5xx
and a reason naming the form.
"""

from __future__ import annotations

from bulwark.networks import in_networks
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bulwark.policy import Policy
from bulwark.policy.runtime import current
from bulwark.policy.verification import sources_for_domain
from ingest.guards import Refusal

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession
    from ingest.verification import Outcome, Verifier

RELAY_DENIED = Refusal("554 5.7.1 Relay access denied", "relay denied")


def may_relay(policy: Policy, session: "GuardSession") -> bool:
    """May this session send to non-local domains? AUTH or a domain mail server
    (or an address the relay exceptions list, which the guide advises against)."""
    return (
        bool(session.authenticated)
        or policy.is_domain_mail_server(session.client_ip)
        or in_networks(session.client_ip, policy.relay_control.exceptions.relay_for_addresses)
    )


def is_domain_mail_server_for(policy: Policy, client_ip: str, domain: str) -> bool:
    """Is the client one of the mail servers configured for this local domain
    (its own, else the default ones, as delivery chooses them)?"""
    return any(in_networks(client_ip, s.trusted_addresses) for s in policy.servers_for_domain(domain))


def _unquoted_ats(path: str) -> int:
    count, quoted, escaped = 0, False, False
    for char in path:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            count += 1
    return count


def raw_path_refusal(arg: str | None) -> Refusal | None:
    """Forms aiosmtpd would rewrite or reject before any hook sees them.

    aiosmtpd drops a source route (handing over the bare mailbox) and answers
    a path with several @ with a bare syntax error; both are judged here, on
    the command's own text, so they are refused with a reason on record.
    """
    if not arg:
        return None
    text = arg.strip()
    if text[:3].upper() == "TO:":
        text = text[3:].strip()
    if text.startswith("<"):
        text = text[1:].split(">", 1)[0]
    else:
        text = text.split(" ", 1)[0]
    if text.startswith("@"):
        return Refusal("553 5.7.1 Source routes are not accepted", "relay attempt: source route")
    if _unquoted_ats(text) > 1:
        return Refusal("553 5.7.1 Several @ in one address are not accepted", "relay attempt: several @")
    return None


def check_recipient(policy: Policy, address: str, may_relay: bool) -> Refusal | None:
    """None to accept, else the refusal."""
    if address.startswith("@") or ":" in address.split("@", 1)[0]:
        return Refusal("553 5.7.1 Source routes are not accepted", "relay attempt: source route")
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return Refusal("553 5.1.3 Recipient address must be user@domain", "malformed address")
    if domain.startswith("["):
        return Refusal("553 5.7.1 Address literals are not accepted", "relay attempt: address literal")
    if policy.is_local_domain(domain):
        # user%other@local, other!user@local and "user@other"@local ask the
        # downstream server to forward the mail elsewhere: a relay through a
        # local domain, whoever the client is.
        if local.startswith('"') and "@" in local:
            return Refusal("553 5.7.1 Quoted local parts containing @ are not accepted",
                           "relay attempt: quoted local part containing @")
        unquoted = local.strip('"')
        if "@" in unquoted:
            return Refusal("553 5.7.1 Several @ in one address are not accepted", "relay attempt: several @")
        if "%" in unquoted:
            return Refusal("553 5.7.1 Routing characters (%) in a local address are not accepted",
                           "relay attempt: percent hack")
        if "!" in unquoted:
            return Refusal("553 5.7.1 Routing characters (!) in a local address are not accepted",
                           "relay attempt: bang path")
        return None
    return None if may_relay else RELAY_DENIED


def check_sender(policy: Policy, session: "GuardSession", sender: str) -> Refusal | None:
    """The guide's first MAIL setting: local mail without AUTH only from the domain's servers."""
    domain = _local_domain_of(policy, sender)
    if domain is None or not policy.relay_control.only_domain_mail_servers_send_local_mail:
        return None
    if session.authenticated or is_domain_mail_server_for(policy, session.client_ip, domain):
        return None
    from ingest.guards.ip_shielding import shield_lets_send_without_auth

    if shield_lets_send_without_auth(policy, session.client_ip, domain):
        return None
    # RFC 4954: 530 5.7.0 when policy requires authentication.
    return Refusal(f"530 5.7.0 Authentication required to send mail from {domain}",
                   "local sender without AUTH from an address that is not a domain mail server")


UNKNOWN_SENDER = Refusal("550 5.1.0 Sender address rejected: not a known local address",
                         "local sender does not exist")


@dataclass(frozen=True)
class UnknownSender:
    """A local sender with no account, judged as far as it can be without asking anyone."""

    refusal: Refusal | None = None
    #: The domain's verification sources: their answer decides (sender_verdict).
    sources: tuple = ()
    #: Why it passes unasked, for its session.mail event.
    note: str | None = None


def sender_existence(policy: Policy, session: "GuardSession", sender: str, accounts: Any) -> UnknownSender | None:
    """The guide's second MAIL setting. None: nothing to judge (not local, the
    rule is off, or the account is known)."""
    domain = _local_domain_of(policy, sender)
    rules = policy.relay_control
    if domain is None or not rules.local_sender_must_exist or accounts is None or accounts.exists(sender):
        return None
    from_server = is_domain_mail_server_for(policy, session.client_ip, domain)
    if session.authenticated and rules.exceptions.unknown_local_sender_if_authenticated:
        return UnknownSender(note="unknown local sender let through by exception "
                                  "unknown_local_sender_if_authenticated")
    if from_server and rules.exceptions.unknown_local_sender_from_domain_mail_servers:
        return UnknownSender(note="unknown local sender let through by exception "
                                  "unknown_local_sender_from_domain_mail_servers")
    sources = sources_for_domain(policy, domain)
    if sources:
        return UnknownSender(sources=tuple(sources))
    if from_server:
        return UnknownSender(note=f"local sender not verified: {domain} has no verification source; "
                                  "sent by its domain mail server")
    return UnknownSender(refusal=UNKNOWN_SENDER)


def sender_verdict(sender: str, outcome: "Outcome") -> Refusal | None:
    """The verification sources' answer about an unknown local sender, as MAIL's reply."""
    if outcome.result == "valid":
        return None
    if outcome.result == "invalid":
        return Refusal(UNKNOWN_SENDER.reply, f"{UNKNOWN_SENDER.reason} ({_answered_by(outcome)})")
    # RFC 3463 4.4.3, as at RCPT: the directory could not answer; the
    # sending server keeps the message and retries.
    return Refusal(f"451 4.4.3 <{sender}>: Sender address cannot be verified now; try again later",
                   f"sender verification unavailable ({outcome.detail})")


def _answered_by(outcome: "Outcome") -> str:
    return f"{outcome.source}{', cached' if outcome.cached else ''}"


def _local_domain_of(policy: Policy, sender: str) -> str | None:
    if not sender or "@" not in sender:
        return None  # the null sender (bounces) is judged by what it is sent to
    domain = sender.rpartition("@")[2].lower()
    return domain if policy.is_local_domain(domain) else None


def take_sender_note(session: "GuardSession") -> str | None:
    """How this MAIL's unknown local sender was let through, for its session.mail event."""
    note = getattr(session, "sender_note", None)
    session.sender_note = None
    return note


class RelayGuard:
    name = "relay"

    def __init__(self, policy: Policy, accounts: Any = None, verifier: "Verifier | None" = None):
        self.policy = policy  # a PolicyHolder in the server: read when judging
        #: ingest.accounts.AccountDirectory, when the server has one.
        self.accounts = accounts
        #: The Verifier RCPT asks (ingest/guards/verification.py), so MAIL
        #: shares its cache and its connections. Without one, a sender that
        #: only a source could vouch for cannot be verified (4xx).
        self.verifier = verifier

    async def on_mail(self, session: "GuardSession", sender: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        session.sender_note = None
        refusal = check_sender(policy, session, sender)
        if refusal is not None:
            return refusal
        unknown = sender_existence(policy, session, sender, self.accounts)
        if unknown is None or not unknown.sources:
            if unknown is not None:
                session.sender_note = unknown.note
            return unknown.refusal if unknown else None
        if self.verifier is None:
            from ingest.verification import Outcome

            outcome = Outcome("unavailable", None, "no verifier in this server", False, 0.0)
        else:
            outcome = await self.verifier.verify(sender, list(unknown.sources), policy)
        refusal = sender_verdict(sender, outcome)
        if refusal is None:
            session.sender_note = f"local sender verified by {_answered_by(outcome)}"
        return refusal

    async def on_rcpt(self, session: "GuardSession", recipient: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        # A recipient a default verification source vouched for in an
        # automatically created domain is local (ingest/guards/verification.py).
        created = recipient.lower() in getattr(session, "created_domain_recipients", ())
        return check_recipient(policy, recipient, created or may_relay(policy, session))

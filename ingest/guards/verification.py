"""User verification at RCPT: an unknown local recipient is asked about before it is accepted.

For a recipient in a local domain that has no account yet, the domain's
verification sources are asked (``ingest.verification``):

- valid: an AccountRecorded is published to the compacted
  ``directory.accounts`` topic (so every ingest node knows the account from
  then on) and the RCPT is accepted;
- invalid: 550 5.1.1, recorded as a refused RCPT, which Dynamic Screening
  counts as a failed RCPT;
- unavailable (every source that did not say "invalid" is down or timed
  out): 451 4.4.3, so the sending server retries later.

The outcome (source, cache hit, latency) goes into the session.rcpt event.

Automatic domain creation. A recipient domain that is not local, arriving
from a client that may not relay, is asked about with the *default* sources.
If one vouches for the recipient, the domain becomes local: a DomainCreated
event on ``directory.domains`` (read back by every ingest node), then the
account as above. This crosses relay control on purpose and narrowly: only
a default source's "valid" for this very address lets the RCPT past the
relay guard, never the mere wish of the client; an "invalid" from the
default sources leaves the decision to relay control (554 relay denied); and
when the default sources cannot answer, the client gets 4xx rather than a
permanent refusal of what may be a new domain's mail. Clients that may relay
(AUTH, domain mail servers) send to outside domains normally; their
recipients are never used to create domains. Local parts carrying routing
characters (% ! @ quotes) never create anything.

This guard runs before the relay guard: it marks the recipients of created
domains on the session, and the relay guard treats those as local.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bulwark.policy.runtime import current
from bulwark.policy.verification import default_sources, sources_for_domain
from bulwark.created_domains import CreatedDomains
from bulwark.settings import Settings
from ingest.guards import Refusal
from ingest.guards.relay import check_recipient, may_relay
from ingest.verification import Outcome, Verifier
from schemas import events as ev

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession

log = logging.getLogger(__name__)

BY = "ingest (user verification)"


def _unknown(address: str) -> Refusal:
    return Refusal(f"550 5.1.1 <{address}>: Recipient address rejected: User unknown", "unknown recipient")


def _cannot_verify(address: str) -> Refusal:
    # RFC 3463 4.4.3: directory server failure.
    return Refusal(f"451 4.4.3 <{address}>: Recipient cannot be verified now; try again later",
                   "recipient verification unavailable")


RECORD_FAILED = Refusal("451 4.3.0 Temporary failure recording the account; please try again later",
                        "account not recorded")


def mark_local(session: "GuardSession", address: str) -> None:
    """A recipient of an automatically created domain: local for relay control."""
    marked = getattr(session, "created_domain_recipients", None)
    if marked is None:
        marked = session.created_domain_recipients = set()
    marked.add(address.lower())


def _record(session: "GuardSession", address: str, verification: ev.RecipientVerification) -> None:
    outcomes = getattr(session, "recipient_verifications", None)
    if outcomes is None:
        outcomes = session.recipient_verifications = {}
    outcomes[address] = verification


def take_verification(session: "GuardSession", address: str) -> ev.RecipientVerification | None:
    """The verification outcome of this RCPT, for its session.rcpt event."""
    return (getattr(session, "recipient_verifications", None) or {}).pop(address, None)


class VerificationGuard:
    name = "user_verification"

    def __init__(self, policy: Any, accounts: Any, publisher: Any, verifier: Verifier,
                 created_domains: CreatedDomains | None = None):
        self.policy = policy  # a PolicyHolder in the server: read when judging
        #: ingest.accounts.AccountDirectory (exists(address)).
        self.accounts = accounts
        self.publisher = publisher
        self.verifier = verifier
        self.created_domains = created_domains if created_domains is not None else CreatedDomains()

    async def on_rcpt(self, session: "GuardSession", recipient: str, params: list[str]) -> Refusal | None:
        policy = current(self.policy)
        address = recipient.strip()
        local, _, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        if not local or not domain or check_recipient(policy, address, True) is not None:
            return None  # malformed or a routing trick: relay control refuses it with its reason
        plain = not any(c in local for c in '%!@"')
        is_local = policy.is_local_domain(domain)
        created = not is_local and domain in self.created_domains
        if is_local:
            sources = sources_for_domain(policy, domain)
        elif not plain:
            return None
        elif created:
            sources = default_sources(policy)
            mark_local(session, address)
        elif policy.user_verification.auto_create_domains and not may_relay(policy, session):
            sources = default_sources(policy)
        else:
            return None
        if not sources or self.accounts.exists(address):
            return None

        outcome = await self.verifier.verify(address, sources, policy)
        if outcome.result == "valid":
            return await self._create(session, address, domain, outcome, new_domain=not is_local and not created)
        _record(session, address, outcome.event())
        if outcome.result == "invalid":
            # Not a recipient of ours: for a domain that is not (yet) local,
            # relay control has the last word.
            return _unknown(address) if is_local or created else None
        return _cannot_verify(address)

    async def _create(self, session: "GuardSession", address: str, domain: str, outcome: Outcome,
                      new_domain: bool) -> Refusal | None:
        try:
            if new_domain:
                await self.publisher.publish(ev.DomainCreated(
                    session_id=session.id, domain=domain, source=outcome.source, by=BY))
                self.created_domains.add(domain)
                log.info("domain %s created: source %s vouched for %s", domain, outcome.source, address)
            await self.publisher.publish(ev.AccountRecorded(
                session_id=session.id, address=address.lower(), domain=domain, source=outcome.source,
                password_hash=None, by=BY))
        except Exception as exc:
            log.error("account %s not recorded: %s", address, type(exc).__name__)
            _record(session, address, outcome.event())
            return RECORD_FAILED
        if new_domain or domain in self.created_domains:
            mark_local(session, address)
        _record(session, address, outcome.event(account_created=True, domain_created=new_domain))
        return None


async def start_verification_guard(settings: Settings, policy: Any, accounts: Any, publisher: Any) -> VerificationGuard:
    """The guard with its view of directory.domains read to its end."""
    domains = CreatedDomains(settings)
    await domains.start()
    verifier = Verifier(helo=current(policy).hostname)
    return VerificationGuard(policy, accounts, publisher, verifier, domains)


async def stop_verification_guard(guard: VerificationGuard) -> None:
    await guard.verifier.close()
    await guard.created_domains.stop()

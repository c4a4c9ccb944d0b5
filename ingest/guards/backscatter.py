"""Backscatter Protection at RCPT and at the end of DATA.

Returned mail — a DSN (null sender) or an auto-reply — addressed to a local
user must come back to a return path Bulwark signed (bulwark/backscatter.py).
Valid ones are delivered to the untagged address. Invalid or missing
signatures are always recorded (a ``session.flagged`` event) and refused
when the policy's ``backscatter.reject`` is on. Exclusions as in the guide:
allow-listed clients, authenticated sessions, domain mail servers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from bulwark.backscatter import Check, Keyring, is_auto_reply, verify
from bulwark.headers import parse_headers
from ingest.guards import Refusal
from schemas import events as ev
from schemas.events import utcnow

if TYPE_CHECKING:
    from bulwark.kafka import EventPublisher
    from bulwark.policy import Policy
    from ingest.guards.session import GuardSession

log = logging.getLogger(__name__)

REFUSAL = Refusal(
    "550 5.7.1 Returned mail for a message this domain did not send (Backscatter Protection)",
    "backscatter: no valid return-path signature",
)


class BackscatterGuard:
    name = "backscatter"

    def __init__(self, current_policy: Callable[[], "Policy"], keyring: Keyring, publisher: "EventPublisher"):
        self.current_policy = current_policy
        self.keyring = keyring
        self.publisher = publisher

    def _settings(self):
        return self.current_policy().backscatter

    def _excluded(self, session: "GuardSession") -> bool:
        cfg, policy = self._settings(), self.current_policy()
        return (
            (cfg.exclude_authenticated and bool(session.authenticated))
            or (cfg.exclude_domain_mail_servers and policy.is_domain_mail_server(session.client_ip))
            or (cfg.exclude_allow_listed and bool(getattr(session, "allow_listed_client", None)))
        )

    def _checks(self, session: "GuardSession") -> dict[str, Check]:
        if not hasattr(session, "backscatter_checks"):
            session.backscatter_checks = {}
        return session.backscatter_checks

    def rewrite_rcpt(self, session: "GuardSession", address: str) -> str:
        """Untag a signed local recipient, remembering whether its signature held."""
        cfg = self._settings()
        if not cfg.enabled:
            return address
        now = utcnow()
        _, keys = self.keyring.keys(now, cfg.validity_days)
        check = verify(address, keys, now, cfg.validity_days)
        self._checks(session)[check.address.lower()] = check
        return check.address if check.status == "valid" else address

    def _flag(self, session: "GuardSession", phase: str, check: Check, refused: bool) -> None:
        self.publisher.emit(
            ev.SessionFlagged(
                session_id=session.id, client_ip=session.client_ip, phase=phase,
                reason=f"backscatter: {check.status} return-path signature",
                detail=f"{check.reason} for <{check.address}>" + ("; refused" if refused else "; logged only"),
            )
        )

    def _suspect(self, session: "GuardSession", recipient: str) -> Check | None:
        local_domain = self.current_policy().is_local_domain(recipient.rpartition("@")[2])
        if not local_domain:
            return None
        check = self._checks(session).get(recipient.lower())
        return None if check is not None and check.status == "valid" else (check or Check("missing", recipient))

    async def on_rcpt(self, session: "GuardSession", recipient: str, params: list[str]) -> Refusal | None:
        cfg = self._settings()
        envelope = getattr(session, "envelope", None)
        # A DSN comes from the null sender (RFC 5321 4.5.5); auto-replies are
        # recognised by their headers at the end of DATA.
        if not cfg.enabled or envelope is None or envelope.mail_from not in ("", "<>") or self._excluded(session):
            return None
        check = self._suspect(session, recipient)
        if check is None:
            return None
        self._flag(session, "rcpt", check, cfg.reject)
        return REFUSAL if cfg.reject else None

    async def on_data(self, session: "GuardSession", raw: bytes) -> Refusal | None:
        cfg = self._settings()
        envelope = getattr(session, "envelope", None)
        if not cfg.enabled or envelope is None or envelope.mail_from in ("", "<>") or self._excluded(session):
            return None  # (DSNs were judged at RCPT)
        if not is_auto_reply(parse_headers(raw)):
            return None
        suspects = [c for c in (self._suspect(session, r) for r in envelope.rcpt_tos) if c is not None]
        for check in suspects:
            self._flag(session, "data", check, cfg.reject)
        return REFUSAL if suspects and cfg.reject else None

"""Account Hijack Detection at ingest: enforce what the streams decided.

Two facts, both from compacted topics held in memory:

- ``accounts.state``: an account disabled (by Account Hijack Detection or an
  administrator). Its AUTH is refused before the password is checked, and
  mail from it (an authenticated session, or a domain mail server's session
  with it as MAIL FROM) is refused with 5xx; the session is dropped.
- ``hijack.limits``: an account at its message limit. Its next messages are
  answered 452 (temporary: the sender's server retries later) until then.

Which account a message belongs to follows ``streams/hijack.py``: the AUTH
login, else, when the policy includes them, the MAIL FROM of a domain mail
server's session.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from bulwark.state import StateView
from ingest.auth import AUTH_DISABLED
from ingest.guards import Refusal
from schemas import events as ev
from streams.hijack import account_key

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession


def _login(session: "GuardSession") -> str | None:
    if not session.authenticated:
        return None
    login = getattr(session.auth_data, "login", None)
    return login.decode() if isinstance(login, bytes) else login


class AccountHijackGuard:
    name = "account-hijack-detection"

    def __init__(self, policy: Any, is_disabled: Callable[[str], bool], limits: StateView):
        self._policy = policy
        self.is_disabled = is_disabled
        self.limits = limits

    @property
    def policy(self):
        return getattr(self._policy, "current", self._policy)

    def _account(self, session: "GuardSession", sender: str) -> str | None:
        login = _login(session)
        if login:
            return account_key(login)
        policy = self.policy
        if policy.hijack.include_domain_mail_servers and sender and policy.is_domain_mail_server(session.client_ip):
            return account_key(sender)
        return None

    def _disabled(self, account: str) -> Refusal | None:
        if not self.is_disabled(account):
            return None
        return Refusal(f"550 5.7.1 Account {account} is disabled; contact your administrator",
                       "Account Hijack Detection: account disabled", close=True)

    async def on_auth(self, session: "GuardSession", login: str) -> Refusal | None:
        # Before the password is checked, and the session is dropped: whoever
        # holds a disabled account's password has no more to do here.
        if not self.is_disabled(account_key(login)):
            return None
        return Refusal(AUTH_DISABLED, "account disabled", close=True)

    async def on_mail(self, session: "GuardSession", sender: str, params: list[str]) -> Refusal | None:
        account = self._account(session, sender)
        if account is None:
            return None
        refusal = self._disabled(account)
        if refusal is not None:
            return refusal
        if not self.policy.hijack.enabled:
            return None
        limit = self.limits.get(account)
        if isinstance(limit, ev.AccountLimitReached) and limit.until > datetime.now(timezone.utc):
            rules = self.policy.hijack
            return Refusal(
                f"452 4.7.1 Account {account} has sent its limit of {rules.message_limit} messages in "
                f"{rules.window_minutes} minutes; try again later",
                "Account Hijack Detection: message limit reached",
            )
        return None

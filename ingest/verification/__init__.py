"""User verification sources: is an unknown local recipient a real user?

The guide's "Verify that a user is valid before creating an account". For a
recipient the gateway has no account for, the sources configured for its
domain are asked in order (the domain's own, else the default sources):

- the first "valid" answer wins (a user may live on the second of two
  servers sharing a domain);
- when none says valid and every one said "invalid", the recipient is
  invalid;
- when none says valid and at least one could not answer, the result is
  "unavailable": the gateway answers 4xx. It never accepts an unverified
  recipient, and never refuses a valid one because a source was down.

Answers are cached per source and address, "valid" for
``user_verification.positive_cache_seconds`` and "invalid" for
``negative_cache_seconds``; "unavailable" is never cached. Concurrent
questions about the same address share one query.

    verifier = Verifier(helo="gateway.example.com")
    outcome = await verifier.verify("alice@example.com", sources, policy)

``authenticate(policy, source_name, address, password)`` checks an AUTH
password against the source that created the account (LDAP and Active
Directory bind; Microsoft 365 only when configured). Passwords are passed to
the source and dropped: never stored, logged or put in an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .base import Finding, Result, SourceUnavailable

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Verifier", "authenticate", "Finding", "SourceUnavailable"]


@dataclass(frozen=True)
class Outcome:
    result: Result
    #: The source whose answer decided; None when no source could answer.
    source: str | None
    detail: str | None
    cached: bool
    latency_ms: float
    #: Every source asked (or answered from the cache), in order.
    asked: tuple[str, ...] = ()

    def event(self, account_created: bool = False, domain_created: bool = False):
        from schemas.events import RecipientVerification

        return RecipientVerification(
            result=self.result, source=self.source, cached=self.cached, latency_ms=round(self.latency_ms, 3),
            detail=self.detail, account_created=account_created, domain_created=domain_created,
        )


def make_client(source, helo: str):
    """The client for one configured source."""
    if source.type == "smtp":
        from .smtp import CallForwardClient

        return CallForwardClient(source, helo)
    if source.type in ("ldap", "active_directory"):
        from .ldap import LdapClient

        return LdapClient(source)
    if source.type == "m365":
        from .m365 import M365Client

        return M365Client(source)
    if source.type == "minger":
        from .minger import MingerClient

        return MingerClient(source)
    raise ValueError(f"unknown source type {source.type!r}")


class Verifier:
    def __init__(self, helo: str = "localhost"):
        self.helo = helo
        #: source name -> (its configuration, its client): a changed
        #: configuration (a new policy) gets a new client.
        self._clients: dict[str, tuple[str, object]] = {}
        self._cache: dict[tuple[str, str], tuple[Finding, float]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        #: Queries actually sent to each source (cache hits excluded).
        self.queries: dict[str, int] = {}

    def client(self, source):
        config = source.model_dump_json()
        held = self._clients.get(source.name)
        if held is None or held[0] != config:
            if held is not None:
                asyncio.ensure_future(held[1].close())
            held = (config, make_client(source, self.helo))
            self._clients[source.name] = held
        return held[1]

    def _cached(self, key: tuple[str, str]) -> Finding | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        finding, expires = entry
        if time.monotonic() >= expires:
            del self._cache[key]
            return None
        return finding

    async def ask(self, source, address: str, policy) -> tuple[Finding, bool]:
        """One source's answer, and whether it came from the cache."""
        key = (source.name, address.lower())
        finding = self._cached(key)
        if finding is not None:
            return finding, True
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), False
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            self.queries[source.name] = self.queries.get(source.name, 0) + 1
            try:
                finding = await self.client(source).verify(address)
            except SourceUnavailable as exc:
                # Named, so "which source is down" is in the event.
                detail = str(exc) if str(exc).startswith(f"{source.name}:") else f"{source.name}: {exc}"
                finding = Finding("unavailable", detail)
            except Exception as exc:  # a broken source is "unavailable", never a crash
                log.exception("verification source %s failed", source.name)
                finding = Finding("unavailable", f"{source.name}: {type(exc).__name__}")
            settings = policy.user_verification
            ttl = {"valid": settings.positive_cache_seconds, "invalid": settings.negative_cache_seconds}.get(
                finding.result, 0
            )
            if ttl > 0:
                self._cache[key] = (finding, time.monotonic() + ttl)
            future.set_result(finding)
            return finding, False
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    async def verify(self, address: str, sources: list, policy) -> Outcome:
        started = time.monotonic()
        unavailable: list[tuple[str, Finding]] = []
        refused: tuple[str, Finding, bool] | None = None
        asked = []
        for source in sources:
            finding, cached = await self.ask(source, address, policy)
            asked.append(source.name)
            if finding.result == "valid":
                return self._done(address, Outcome("valid", source.name, finding.detail, cached,
                                                   _ms(started), tuple(asked)))
            if finding.result == "invalid":
                refused = refused or (source.name, finding, cached)
            else:
                unavailable.append((source.name, finding))
        if unavailable:
            details = "; ".join(f.detail for _, f in unavailable)
            return self._done(address, Outcome("unavailable", None, details, False, _ms(started), tuple(asked)))
        if refused is None:
            return self._done(address, Outcome("unavailable", None, "no verification source", False,
                                               _ms(started), tuple(asked)))
        name, finding, cached = refused
        return self._done(address, Outcome("invalid", name, finding.detail, cached, _ms(started), tuple(asked)))

    @staticmethod
    def _done(address: str, outcome: Outcome) -> Outcome:
        log.info("verified %s: %s by %s%s in %.1f ms (%s)", address, outcome.result, outcome.source or "no source",
                 " (cached)" if outcome.cached else "", outcome.latency_ms, outcome.detail)
        return outcome

    async def close(self) -> None:
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


# One per process, so AUTH shares clients (and Microsoft 365's cached token)
# between logins.
_shared: Verifier | None = None


async def authenticate(policy, source_name: str, address: str, password: str) -> bool | None:
    """Check an AUTH password against the source that created the account.

    True: the source accepted it. False: refused, or the source cannot check
    passwords (SMTP call-forward, Minger; Microsoft 365 unless
    ``password_auth``). None: the source could not be reached.
    """
    global _shared
    policy = getattr(policy, "current", policy)
    source = next((s for s in policy.verification_sources if s.name == source_name), None)
    if source is None:
        log.warning("account %s was created by source %r, which the policy no longer has", address, source_name)
        return False
    if not source.checks_passwords():
        log.info("source %s (%s) does not check passwords: AUTH as %s refused", source_name, source.type, address)
        return False
    if _shared is None:
        _shared = Verifier(helo=policy.hostname)
    result = await _shared.client(source).authenticate(address, password)
    if result is None:
        log.warning("source %s could not be reached to authenticate %s", source_name, address)
    return result

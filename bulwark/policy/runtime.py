"""The active policy at run time: what every component reads when it decides.

``bulwark policy apply`` publishes a validated policy to the compacted
``config.policy`` topic. Each component keeps a :class:`PolicyHolder` that
follows that topic, so a new policy takes effect without a restart. Code reads
``holder.current`` at the moment it decides and never copies policy values
into long-lived objects.

Before anything is published the holder falls back to the file at
``$BULWARK_POLICY``. A published document that no longer validates (written by
a newer Bulwark, say) is logged and ignored: the running policy stays.

For code written against a :class:`Policy` the holder also answers attribute
reads itself (``holder.local_domains`` is ``holder.current.local_domains``),
so such code follows the live policy when handed a holder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from bulwark.policy import Policy, PolicyError, from_document, load
from bulwark.settings import Settings
from schemas.events import Event, PolicyPublished
from schemas.topics import POLICY

log = logging.getLogger(__name__)


class PolicyHolder:
    def __init__(self, policy: Policy | None = None, settings: Settings | None = None):
        self._current = policy
        self.settings = settings
        #: The PolicyPublished event in force, or None while on the file.
        self.published: PolicyPublished | None = None
        self._view = None
        self._started = False
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[Policy], None]] = []

    @classmethod
    def fixed(cls, policy: Policy) -> "PolicyHolder":
        """A holder that never changes (unit tests, one-off commands)."""
        holder = cls(policy)
        holder._started = True
        return holder

    @classmethod
    def of(cls, policy: "Policy | PolicyHolder") -> "PolicyHolder":
        return policy if isinstance(policy, PolicyHolder) else cls.fixed(policy)

    # -- reading --------------------------------------------------------------

    @property
    def current(self) -> Policy:
        if self._current is None:
            # Not started and nothing given: the file is all there is.
            assert self.settings is not None, "a PolicyHolder needs a policy or settings"
            self._current = load(self.settings.policy_path)
        return self._current

    @property
    def version(self) -> str:
        return self.current.version

    def __getattr__(self, name: str):
        # Only reached for names the holder lacks: delegate to the live policy.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.current, name)

    def on_change(self, listener: Callable[[Policy], None]) -> None:
        self._listeners.append(listener)

    # -- following config.policy ----------------------------------------------

    async def start(self, timeout: float = 60) -> None:
        """Read config.policy to its end, then follow it. Idempotent."""
        async with self._lock:
            if self._started:
                return
            from bulwark.state import StateView

            assert self.settings is not None
            view = StateView(self.settings, POLICY)
            view.on_change(self._published)
            await view.start(timeout)
            self._view = view
            self._started = True
            if self.published is None and self._current is None:
                # Nothing published yet: the file, which must be valid.
                self._current = load(self.settings.policy_path)
            log.info("policy %s in force (%s)", self.current.version,
                     f"published by {self.published.applied_by}" if self.published else f"file {self.settings.policy_path}")

    async def stop(self) -> None:
        if self._view is not None:
            await self._view.stop()

    def _published(self, key: str, event: Event | None) -> None:
        if not isinstance(event, PolicyPublished):
            return
        try:
            policy = from_document(event.document, f"config.policy ({event.source})",
                                   version=event.policy_version)
        except PolicyError as exc:
            log.error("ignoring published policy %s; the running one stays: %s", event.policy_version, exc)
            return
        changed = self._current is None or self._current.version != policy.version
        self._current = policy
        self.published = event
        if changed:
            log.info("policy %s now in force (applied by %s from %s)",
                     policy.version, event.applied_by, event.source)
            for listener in self._listeners:
                listener(policy)


def describe(event: PolicyPublished) -> str:
    when: datetime = event.occurred_at
    return (f"policy {event.policy_version}, applied {when:%Y-%m-%d %H:%M:%S} UTC "
            f"by {event.applied_by} from {event.source}")


def current(policy: "Policy | PolicyHolder") -> Policy:
    """The policy to decide with, read once per decision (so one decision
    never mixes two versions)."""
    return policy.current if isinstance(policy, PolicyHolder) else policy


async def policy_in_force(settings: Settings) -> Policy:
    """The policy in force now (published on config.policy, else the file), read once."""
    holder = PolicyHolder(settings=settings)
    await holder.start()
    try:
        return holder.current
    finally:
        await holder.stop()

"""Domains made local by automatic domain creation, followed from ``directory.domains``.

The policy's ``local_domains`` is what the administrator wrote; a default
user verification source can add to it at run time (a DomainCreated event).
Ingest treats such a domain as local for relay control, and delivery routes
its mail to the domain mail servers (the default ones), exactly as for a
domain in the policy. Without the latter, mail for a created domain would go
out by MX, which points back at the gateway.
"""

from __future__ import annotations

from bulwark.settings import Settings
from bulwark.state import StateView
from schemas import events as ev
from schemas.topics import DOMAINS


class CreatedDomains:
    def __init__(self, settings: Settings | None = None):
        self.names: set[str] = set()
        self.view = StateView(settings, DOMAINS) if settings is not None else None
        if self.view is not None:
            self.view.on_change(self._changed)

    def _changed(self, key: str, event: ev.Event | None) -> None:
        if isinstance(event, ev.DomainCreated):
            self.names.add(event.domain)
        elif event is None:  # a tombstone: the domain was removed
            self.names.discard(key)

    def add(self, domain: str) -> None:
        """Known here at once; the event tells every other node."""
        self.names.add(domain)

    def __contains__(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.names

    async def start(self) -> None:
        if self.view is not None:
            await self.view.start()

    async def stop(self) -> None:
        if self.view is not None:
            await self.view.stop()

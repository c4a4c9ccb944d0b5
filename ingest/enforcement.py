"""The facts ingest enforces from the streams: Dynamic Screening bans and
Account Hijack Detection limits and disabled accounts.

Each is a compacted topic read into memory at start-up and followed
(:class:`bulwark.state.StateView`), so enforcing one never waits on Kafka.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bulwark.settings import Settings
from bulwark.state import StateView
from ingest.guards.hijack import AccountHijackGuard
from ingest.guards.screening import DynamicScreeningGuard
from schemas.topics import BANS, HIJACK_LIMITS


async def start_abuse_guards(settings: Settings, policy: Any, accounts: Any) -> list:
    """The two guards, with their views read to the end of their topics.

    ``accounts`` is the AccountDirectory (it already follows accounts.state,
    where disabled accounts are).
    """
    # read_uncommitted: the streams publish under exactly-once, so a
    # read_committed view would see a ban only when the worker's transaction
    # commits (every 2.8 s in Faust). A fact from a transaction that is then
    # aborted is published again when the worker reprocesses the same events
    # (the decision is a function of them), so enforcing it early is safe.
    bans = StateView(settings, BANS, isolation_level="read_uncommitted")
    limits = StateView(settings, HIJACK_LIMITS, isolation_level="read_uncommitted")
    await asyncio.gather(bans.start(), limits.start())
    return [DynamicScreeningGuard(policy, bans), AccountHijackGuard(policy, accounts.is_disabled, limits)]

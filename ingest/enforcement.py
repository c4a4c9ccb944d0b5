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
    # The workers publish these facts without transactions (streams/once.py),
    # so they are visible the moment the broker has them.
    bans = StateView(settings, BANS)
    limits = StateView(settings, HIJACK_LIMITS)
    await asyncio.gather(bans.start(), limits.start())
    return [DynamicScreeningGuard(policy, bans), AccountHijackGuard(policy, accounts.is_disabled, limits)]

"""A state view started while the broker is down waits for it.

Every component reads its policy through a StateView when it starts; one
that exited instead (a sink restarted during a broker outage) crash-looped
until `bulwark up` gave up on it and stopped the whole gateway (seen in
bench/chaos.py: the DMARC-report sink, restarted a second before the broker
was killed).
"""

from __future__ import annotations

import asyncio
import logging

from bulwark.devstack import free_port
from bulwark.settings import Settings
from bulwark.state import BROKER_RETRY_SECONDS, StateView
from schemas.topics import POLICY


async def test_a_view_started_with_no_broker_keeps_waiting_for_it(caplog):
    settings = Settings.from_env().with_(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    view = StateView(settings, POLICY)
    caplog.set_level(logging.WARNING, logger="bulwark.state")
    starting = asyncio.create_task(view.start(timeout=5))
    # Long enough for three refused connections: each fails at once.
    await asyncio.sleep(3 * BROKER_RETRY_SECONDS)
    try:
        assert not starting.done(), starting.exception()
        waits = [r for r in caplog.records if "waiting for Kafka" in r.getMessage()]
        assert len(waits) >= 2
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await view.stop()

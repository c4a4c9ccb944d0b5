"""What every long-running Bulwark process shares: logging and a clean stop."""

from __future__ import annotations

import asyncio
import logging
import signal


def configure_logging(component: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka logs every reconnect attempt at ERROR during a broker outage;
    # Bulwark reports the outage itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def run_until_signalled(*coros) -> None:
    """Run the coroutines until SIGINT/SIGTERM, or until one of them fails."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(c) for c in coros]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task is not stopper and task.exception():
            raise task.exception()

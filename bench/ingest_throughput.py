"""Ingest: messages accepted per second, and the 250 latency, with concurrent sessions.

Every 250 here means the message was fsynced into the blob store and its
event committed to Kafka (acks=all) — the same guarantee as in production.
The run compares 1 session with many concurrent sessions: if sessions
serialized on one flush per message, throughput would not grow with them.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiosmtplib

from bench._stack import local_stack

# Ingest alone: no stream worker, so no verdict to wait for at end of DATA.
POLICY = """
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {name: sink, host: 127.0.0.1, port: 9, default: true}
inline_refusal: {enabled: false}
"""

# A 10 KB message in 76-character lines, as a mail client would send it.
BODY = ("From: a@partner.test\r\nTo: b@example.test\r\nSubject: bench\r\n\r\n"
        + ("x" * 76 + "\r\n") * 130).encode()


async def _session(port: int, count: int, latencies: list[float]) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    for i in range(count):
        started = time.perf_counter()
        await client.sendmail("a@partner.test", ["b@example.test"], BODY + str(i).encode())
        latencies.append(time.perf_counter() - started)
    await client.quit()


async def _measure(port: int, sessions: int, per_session: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(_session(port, per_session, latencies) for _ in range(sessions)))
    return sessions * per_session / (time.perf_counter() - started), latencies


def run() -> None:
    with local_stack(POLICY, components=("ingest",)) as (settings, _):
        asyncio.run(_measure(settings.smtp_port, 2, 10))  # warm-up: connections, producer id, metadata
        print(f"{'sessions':>8} {'messages':>8} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for sessions, per_session in ((1, 200), (10, 40), (50, 10)):
            rate, lat = asyncio.run(_measure(settings.smtp_port, sessions, per_session))
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"{sessions:>8} {sessions * per_session:>8} {rate:>8.0f} "
                  f"{statistics.median(lat) * 1000:>8.1f} {p99 * 1000:>8.1f}", flush=True)

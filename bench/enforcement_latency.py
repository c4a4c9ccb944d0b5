"""Dynamic Screening enforcement latency: threshold-crossing event to ingest refusing the client.

Starts a private stack (Kafka, topics, one Faust worker, ingest). For each
of N client addresses a real SMTP session fails RCPTs up to the limit; the
clock starts when the gateway answers the RCPT that crosses the threshold
and stops when ingest refuses the same session's next command with 421
(NOOPs sent back to back). That is the whole path: the session event to
Kafka, the worker's windowed count, the ban on screening.bans, ingest's view.

    .venv/bin/python -m bench enforcement_latency
"""

from __future__ import annotations

import json
import smtplib
import statistics
import time
import urllib.request

from bench._stack import local_stack
from bulwark.settings import Settings

LIMIT = 5
CLIENTS = 20

POLICY = f"""
hostname: bench.example.test
local_domains: [example.test]
screening:
  failed_rcpt_limit: {LIMIT}
  ban_minutes: 1
"""


def worker_ready(settings: Settings) -> bool:
    from ingest.tls import certificate_path, client_context

    url = f"https://127.0.0.1:{settings.streams_web_port}/screening/ip/127.0.0.1/"
    try:
        context = client_context(certificate_path(settings))  # made by the worker at start-up
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            return "counters" in json.load(r)
    except (OSError, ValueError):
        return False


def one_client(settings: Settings, ip: str) -> float:
    client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30, source_address=(ip, 0))
    client.ehlo("bench.test")
    client.mail("bench@elsewhere.test")
    for i in range(LIMIT - 1):
        client.rcpt(f"x{i}@elsewhere.test")
    client.rcpt("crossing@elsewhere.test")
    started = time.perf_counter()
    while True:
        code, _ = client.noop()
        if code == 421:
            elapsed = time.perf_counter() - started
            client.close()
            return elapsed
        if time.perf_counter() - started > 30:
            raise RuntimeError(f"{ip} was never refused")


def run() -> None:
    with local_stack(POLICY, components=("streams", "ingest")) as (settings, stack):
        deadline = time.monotonic() + 180
        while not worker_ready(settings):
            if time.monotonic() > deadline:
                raise RuntimeError("the Faust worker never answered:\n" + stack.log_tail("streams"))
            time.sleep(0.5)
        one_client(settings, "127.0.1.250")  # warm-up: the first transaction, the first ban
        latencies = [one_client(settings, f"127.0.1.{n}") for n in range(1, CLIENTS + 1)]
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    print(f"  {len(ms)} clients, threshold-crossing RCPT answered -> same session refused 421:")
    print(f"  min {ms[0]:.0f} ms   median {statistics.median(ms):.0f} ms   p95 {p95:.0f} ms   max {ms[-1]:.0f} ms",
          flush=True)

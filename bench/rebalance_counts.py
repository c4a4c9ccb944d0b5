"""Dynamic Screening counts through rebalances: two workers, joins, leaves, crashes, a broker restart.

Starts a private stack (Kafka, topics, clamd, ingest, one Faust worker).
Client threads open SMTP sessions from 20 loopback addresses and fail RCPTs
(relay refused), and the script counts the refusals it was given. Then, one
after the other, with the clients still sending: a second worker joins; it
leaves; it joins again; the first worker is SIGKILLed and restarted; the
second is; and the broker restarts (the clients pause for that). After each
step the clients pause and the script asks the workers' table views for
every address until each count equals what the clients were refused. It
prints how long that took, or which counts were still wrong after 180 s.

    .venv/bin/python -m bench rebalance_counts
"""

from __future__ import annotations

import json
import os
import random
import signal
import smtplib
import threading
import time
import urllib.request

from bench._stack import local_stack
from bulwark.devstack import free_port
from bulwark.settings import Settings

CLIENTS = [f"127.0.0.{n}" for n in range(70, 90)]
PHASE_SECONDS = 20
SETTLE_SECONDS = 180

# Limits no client reaches, and a window longer than the run.
POLICY = """
hostname: bench.example.test
local_domains: [example.test]
screening:
  failed_rcpt_limit: 1000000
  connection_limit: 1000000
  window_minutes: 60
"""


class Clients:
    """Threads failing RCPTs from every address, counting the refusals."""

    def __init__(self, settings: Settings, threads: int = 3):
        self.settings, self.threads = settings, threads
        self.refused = dict.fromkeys(CLIENTS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running: list[threading.Thread] = []

    def _session(self) -> None:
        while not self._stop.is_set():
            ip = random.choice(CLIENTS)
            try:
                client = smtplib.SMTP(self.settings.smtp_host, self.settings.smtp_port, timeout=30,
                                      source_address=(ip, 0))
                client.ehlo("bench.test")
                client.mail("bench@elsewhere.test")
                for i in range(3):
                    if client.rcpt(f"victim{i}@elsewhere.test")[0] == 554:
                        with self._lock:
                            self.refused[ip] += 1
                client.quit()
            except (smtplib.SMTPException, OSError):
                pass  # a refusal that was not counted here is not expected there either
            time.sleep(0.02)

    def start(self) -> None:
        self._stop.clear()
        self._running = [threading.Thread(target=self._session, daemon=True) for _ in range(self.threads)]
        for thread in self._running:
            thread.start()

    def pause(self) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join()


def counted(settings: Settings, port: int, ip: str) -> int | None:
    from ingest.tls import certificate_path, client_context

    url = f"https://127.0.0.1:{port}/screening/ip/{ip}/"
    try:
        with urllib.request.urlopen(url, timeout=10, context=client_context(certificate_path(settings))) as r:
            return json.load(r)["counters"]["failed_rcpt"]
    except (OSError, ValueError, KeyError):
        return None


def settle(settings: Settings, ports: list[int], expected: dict[str, int]) -> str:
    """Wait until a worker reports every count as expected; say how long it took."""
    started = time.monotonic()
    wrong: dict[str, tuple] = {}
    while time.monotonic() - started < SETTLE_SECONDS:
        for port in ports:  # whichever worker answers; each routes a key to its owner
            got = {ip: counted(settings, port, ip) for ip in CLIENTS}
            wrong = {ip: (got[ip], n) for ip, n in expected.items() if got[ip] != n}
            if not wrong:
                return f"exact after {time.monotonic() - started:.1f} s"
        time.sleep(1)
    return f"{len(wrong)} of {len(CLIENTS)} wrong after {SETTLE_SECONDS} s: " + ", ".join(
        f"{ip} {got} (expected {n})" for ip, (got, n) in sorted(wrong.items()))


def run() -> None:
    with local_stack(POLICY, components=("streams", "ingest")) as (settings, stack):
        first_port, second_port = settings.streams_web_port, free_port()
        from ingest.tls import certificate_path

        second_env = {"BULWARK_DATA_DIR": str(settings.data_dir / "worker-2"),
                      "BULWARK_STREAMS_WEB_PORT": str(second_port),
                      "BULWARK_STREAMS_METRICS_PORT": str(free_port()),
                      "BULWARK_TLS_CERT": str(certificate_path(settings)),
                      "BULWARK_TLS_KEY": str(certificate_path(settings).with_suffix(".key"))}
        while counted(settings, first_port, CLIENTS[0]) is None:
            time.sleep(0.5)

        def kill(name: str) -> None:
            proc = stack.procs.pop(name)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

        def restart_broker() -> None:
            clients.pause()  # ingest answers 451 meanwhile; that is another test
            stack.stop_kafka()
            time.sleep(5)
            stack.start_kafka()
            clients.start()

        steps = [
            ("second worker joins", lambda: stack.start("streams-2", ["streams", "worker"], second_env)),
            ("second worker stops", lambda: stack.stop("streams-2")),
            ("second worker joins again", lambda: stack.start("streams-2", ["streams", "worker"], second_env)),
            ("first worker SIGKILLed, restarted",
             lambda: (kill("streams"), stack.start("streams", ["streams", "worker"]))),
            ("second worker SIGKILLed, restarted",
             lambda: (kill("streams-2"), stack.start("streams-2", ["streams", "worker"], second_env))),
            ("broker restarted", restart_broker),
        ]
        clients = Clients(settings)
        for what, step in steps:
            clients.start()
            time.sleep(PHASE_SECONDS / 2)
            step()
            time.sleep(PHASE_SECONDS / 2)
            clients.pause()
            total = sum(clients.refused.values())
            print(f"{what:38} {total:6} refusals so far: {settle(settings, [first_port, second_port], clients.refused)}",
                  flush=True)


if __name__ == "__main__":
    run()

"""The Faust workers failing over: a second worker taking half the keys
while mail flows, and a worker killed mid-stream keeping its counts
(Dynamic Screening's tables).

These rebalance and restart the session's worker, so they live in a file
that sorts last: a test of another feature never runs while a worker is
recovering.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ingest.tls import certificate_path

from .abuse_helpers import close_quietly, counters, failed_rcpts, wait_for, web_url
from .conftest import free_port

pytestmark = pytest.mark.integration


def ensure_worker_running(gateway) -> None:
    """Leave a Faust worker running for the tests after these, whatever happened here."""
    stack = gateway.stack
    worker = stack.procs.get("streams")
    if worker is None or worker.poll() is not None:
        stack.procs.pop("streams", None)
        stack.start("streams", ["streams", "worker"])


def second_worker_env(gateway, tmp_path) -> dict[str, str]:
    """A worker of the same app on this host: its own store, web and metrics ports, the deployment's certificate."""
    return {"BULWARK_DATA_DIR": str(tmp_path / "worker-2"),
            "BULWARK_BLOB_DIR": str(gateway.settings.blob_dir),
            "BULWARK_STREAMS_WEB_PORT": str(free_port()),
            "BULWARK_STREAMS_METRICS_PORT": str(free_port()),
            "BULWARK_TLS_CERT": str(certificate_path(gateway.settings)),
            "BULWARK_TLS_KEY": str(certificate_path(gateway.settings).with_suffix(".key"))}


def test_two_workers_share_the_keys_and_count_right(gateway, tmp_path):
    """A second worker joins while clients keep failing RCPTs, then leaves: every count stays exact."""
    ips = [f"127.0.0.{n}" for n in range(70, 80)]
    sent = dict.fromkeys(ips, 0)
    sessions = dict.fromkeys(ips, 0)

    def burst(rcpts: int) -> None:
        for ip in ips:
            close_quietly(failed_rcpts(gateway, ip, rcpts))
            sent[ip] += rcpts
            sessions[ip] += 1

    def owners(base: str) -> dict[str, str | None]:
        return {ip: (counters(gateway, ip, base) or {}).get("worker") for ip in ips}

    def all_counted(base: str) -> dict | None:
        answers = {ip: counters(gateway, ip, base) for ip in ips}
        exact = all(a and a["counters"]["failed_rcpt"] == sent[ip] and a["counters"]["connections"] == sessions[ip]
                    for ip, a in answers.items())
        return answers if exact else None

    env = second_worker_env(gateway, tmp_path)
    second_url = f"https://127.0.0.1:{env['BULWARK_STREAMS_WEB_PORT']}"
    burst(2)  # one worker owns every key
    gateway.stack.start("streams-2", ["streams", "worker"], env)
    try:
        # Mail keeps coming while the group rebalances and the second worker
        # recovers its half of the tables from the changelogs.
        deadline = time.monotonic() + 180
        while len({o for o in owners(second_url).values() if o}) < 2:
            assert time.monotonic() < deadline, f"the keys never split: {owners(second_url)}"
            if sum(sessions.values()) < 6 * len(ips):  # stays under the ban thresholds
                burst(1)
            time.sleep(1)
        burst(2)
        split = owners(web_url(gateway))
        assert len(set(split.values())) == 2
        # Either worker answers for every key, from the worker that owns it.
        for base in (web_url(gateway), second_url):
            answers = wait_for(f"exact counts through {base}", lambda: all_counted(base), timeout=180)
            assert {ip: a["worker"] for ip, a in answers.items()} == split
        # The second worker leaves: the first takes its keys back, with their counts.
        gateway.stack.stop("streams-2")
        burst(1)
        answers = wait_for("exact counts after the second worker left", lambda: all_counted(web_url(gateway)),
                           timeout=180)
        assert {a["worker"].rstrip("/") for a in answers.values()} == {web_url(gateway)}
    finally:
        gateway.stack.stop("streams-2")
        ensure_worker_running(gateway)


def test_worker_killed_mid_stream_keeps_its_counts(gateway):
    """RocksDB plus changelog recovery: no count lost, none doubled (streams/once.py)."""
    try:
        _kill_and_restart_mid_stream(gateway, "127.0.0.58")
    finally:
        ensure_worker_running(gateway)


def _kill_and_restart_mid_stream(gateway, ip: str) -> None:
    close_quietly(failed_rcpts(gateway, ip, 8))
    wait_for("8 counted", lambda: (a := counters(gateway, ip)) and a["counters"]["failed_rcpt"] == 8, timeout=180)
    stack = gateway.stack
    worker = stack.procs["streams"]
    client = failed_rcpts(gateway, ip, 3)
    os.killpg(worker.pid, signal.SIGKILL)  # mid-stream: these three may be half processed
    worker.wait()
    for i in range(4):  # and more while it is down; ingest keeps recording
        assert client.rcpt(f"late{i}@elsewhere.test")[0] == 554
    close_quietly(client)
    stack.procs.pop("streams")
    stack.start("streams", ["streams", "worker"])
    final = wait_for("counts back after the restart",
                     lambda: (a := counters(gateway, ip)) and a["counters"]["failed_rcpt"] >= 15 and a, timeout=180)
    assert final["counters"]["failed_rcpt"] == 15
    assert final["counters"]["connections"] == 2

"""The Faust worker failing over: a second worker taking half the keys, and a
worker killed mid-stream keeping its counts (Dynamic Screening's tables).

These restart and rebalance the session's one worker, so they live in a file
that sorts last: a test of another feature never runs while the worker is
recovering. Known limit (see the team report): under exactly_once a
rebalance can leave aiokafka transactions open ("Invalid state transition
IN_TRANSACTION -> IN_TRANSACTION"); the worker's recovery then stops with
Faust's ConsistencyError. ``ensure_worker_running`` leaves a worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def test_two_workers_share_the_keys_and_count_right(gateway, tmp_path):
    env = {**gateway.stack.env,
           "BULWARK_DATA_DIR": str(tmp_path / "worker2"),
           "BULWARK_BLOB_DIR": str(gateway.settings.blob_dir),
           "BULWARK_STREAMS_WEB_PORT": str(free_port()),
           # Every worker serves the deployment's one certificate (streams/web.py):
           # the first worker's, generated under its data directory.
           "BULWARK_TLS_CERT": str(certificate_path(gateway.settings)),
           "BULWARK_TLS_KEY": str(certificate_path(gateway.settings).with_suffix(".key"))}
    second_url = f"https://127.0.0.1:{env['BULWARK_STREAMS_WEB_PORT']}"
    log = open(gateway.stack.log_dir / "streams-2.log", "ab")
    # Both workers join one initial rebalance (the broker waits
    # group.initial.rebalance.delay.ms for members of an empty group), so no
    # exactly-once transaction is open while partitions move — the known
    # limit above is about rebalances under traffic.
    gateway.stack.stop("streams")
    second = subprocess.Popen([sys.executable, "-m", "bulwark.cli", "streams", "worker"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gateway.stack.start("streams", ["streams", "worker"])
    try:
        ips = [f"127.0.0.{n}" for n in range(70, 80)]
        owners = wait_for("both workers own keys", lambda: (
            (o := {ip: (counters(gateway, ip) or {}).get("worker") for ip in ips})
            and None not in o.values() and len(set(o.values())) == 2 and o), timeout=180)
        for n, ip in enumerate(ips, start=1):
            close_quietly(failed_rcpts(gateway, ip, n))
        for base in (web_url(gateway), second_url):  # either worker answers for every key
            for n, ip in enumerate(ips, start=1):
                answer = wait_for(f"{ip} counted", lambda: (a := counters(gateway, ip, base))
                                  and a["counters"]["failed_rcpt"] == n and a, timeout=180)
                assert answer["worker"] == owners[ip]
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
        ensure_worker_running(gateway)


def test_worker_killed_mid_stream_keeps_its_counts(gateway):
    """RocksDB plus changelog recovery under exactly-once: no count lost, none doubled.

    After the two-worker test, so no rebalance follows a crash here.
    """
    try:
        _restart_worker_cleanly(gateway)
        _kill_and_restart_mid_stream(gateway, "127.0.0.58")
    finally:
        ensure_worker_running(gateway)


def _restart_worker_cleanly(gateway) -> None:
    """Start from one worker that owns every partition and answers.

    Earlier tests rebalanced this worker (a broker restart, a second worker);
    under exactly_once that can leave it wedged (the known limit above),
    which is a different failure from the one each test here is about. A
    clean stop and start is what a service manager does to such a worker.
    """
    gateway.stack.stop("streams")
    gateway.stack.start("streams", ["streams", "worker"])
    wait_for("the worker answering", lambda: counters(gateway, "127.0.0.57") is not None, timeout=180)


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

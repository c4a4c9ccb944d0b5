"""The Faust worker failing over: a worker killed mid-stream keeps its counts
(Dynamic Screening's tables).

This restarts the session's one worker, so it lives in a file that sorts
last: a test of another feature never runs while the worker is recovering.

Not here: two workers sharing the keys. Under exactly_once a rebalance that
moves partitions while transactions are open leaves aiokafka transactions
in a bad state ("Invalid state transition IN_TRANSACTION -> IN_TRANSACTION")
and a worker wedges or miscounts; a test of it passed alone and failed in
CI's full run, so it is not claimed (README, known limits; issue 5 stays
open for it).
"""

from __future__ import annotations

import os
import signal

import pytest

from .abuse_helpers import close_quietly, counters, failed_rcpts, wait_for

pytestmark = pytest.mark.integration


def ensure_worker_running(gateway) -> None:
    """Leave a Faust worker running for the tests after these, whatever happened here."""
    stack = gateway.stack
    worker = stack.procs.get("streams")
    if worker is None or worker.poll() is not None:
        stack.procs.pop("streams", None)
        stack.start("streams", ["streams", "worker"])


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

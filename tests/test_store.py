"""The sinks' durable index: relaxed writes and the group commit that puts them on disk."""

from __future__ import annotations

import asyncio
import threading

from sinks.store import JsonIndex


class _CountingWal:
    """The index's database with its WAL fsyncs counted and held until released."""

    def __init__(self, db):
        self.db = db
        self.fsyncs = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.covered: list[set[bytes]] = []  # the keys written before each fsync began

    def flush_wal(self, sync: bool) -> None:
        self.fsyncs += 1
        self.covered.append({key for key in self.db.keys()})
        self.started.set()
        assert self.release.wait(10)
        self.db.flush_wal(sync)

    def __getattr__(self, name):
        return getattr(self.db, name)


def _while_an_fsync_runs(tmp_path, writes: list[str]) -> tuple[JsonIndex, _CountingWal, list[bool]]:
    """Write "first" and start its sync; while that fsync runs, write each of
    ``writes`` and sync after each; then let the fsyncs finish. Returns the
    index, its counted log and, per later sync, whether it had returned
    before the first fsync was let finish."""
    index = JsonIndex(tmp_path / "queue")
    wal = index.db = _CountingWal(index.db)
    early: list[bool] = []

    async def scenario():
        index.put("first", {"n": 0}, synced=False)
        first = asyncio.ensure_future(index.sync())
        await asyncio.to_thread(wal.started.wait, 10)
        later = []
        for n, key in enumerate(writes, 1):
            index.put(key, {"n": n}, synced=False)
            later.append(asyncio.ensure_future(index.sync()))
        await asyncio.sleep(0.2)
        early.extend(task.done() for task in later)
        wal.release.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)

    asyncio.run(scenario())
    return index, wal, early


def test_a_sync_waits_for_an_fsync_that_began_after_its_writes(tmp_path):
    """A write made while an fsync is already running is not on disk when
    that fsync ends: whoever syncs after it waits for the next one."""
    _, wal, early = _while_an_fsync_runs(tmp_path, ["second"])
    assert early == [False]
    assert wal.fsyncs == 2
    assert b"second" not in wal.covered[0] and b"second" in wal.covered[1]


def test_deliveries_waiting_together_share_one_fsync(tmp_path):
    """Twenty deliveries that record their outcome while an fsync runs are
    put on disk by one more fsync, not twenty (the group commit)."""
    keys = [f"m{n}" for n in range(1, 21)]
    index, wal, early = _while_an_fsync_runs(tmp_path, keys)
    assert not any(early)
    assert wal.fsyncs == 2
    assert {key.encode() for key in keys} <= wal.covered[1]
    # Readers saw every relaxed write at once, and the store has them all.
    assert [index.get(key)["n"] for key in keys] == list(range(1, 21))


def test_a_sync_with_nothing_written_does_not_touch_the_disk(tmp_path):
    index = JsonIndex(tmp_path / "queue")
    wal = index.db = _CountingWal(index.db)
    wal.release.set()
    index.put("synced", {"n": 1})  # synced writes are on disk already
    asyncio.run(index.sync())
    assert wal.fsyncs == 0

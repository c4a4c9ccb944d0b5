"""A small durable index (RocksDB via rocksdict) of JSON records by message id.

Writes are synchronous (fsynced WAL) by default: a sink commits its Kafka
offset only after the record is on disk, so a power cut never loses what the
offset says was handled. The CLI opens the same index read-only beside a
running sink.

A relaxed write (``put(..., synced=False)``) is in the write-ahead log at
once, so a crash of the process keeps it, and readers see it at once; it is
on disk after the next ``sync()``, or the next synced write, since the log
is written in order. ``sync()`` is a group commit: one fsync of the log, on a
thread, for every relaxed write made before it, however many callers wait.
Measured on this machine's ext4: a synced write took 236 us of wall time,
113 us of it CPU, against 8 us relaxed, and the event loop waits for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions


class JsonIndex:
    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        options = Options(raw_mode=True)
        if read_only:
            self.db = Rdict(str(self.path), options=options, access_type=AccessType.read_only())
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            options.create_if_missing(True)
            self.db = Rdict(str(self.path), options=options)
            durable = WriteOptions()
            durable.sync = True
            self.db.set_write_options(durable)
            self._relaxed = WriteOptions()
            self._relaxed.sync = False
        #: Relaxed writes made, and how many of them the last sync covered.
        self._writes = self._synced = 0
        self._syncing = asyncio.Lock()

    def get(self, key: str) -> dict | None:
        raw = self.db.get(key.encode())
        return None if raw is None else json.loads(raw)

    def __contains__(self, key: str) -> bool:
        return self.db.get(key.encode()) is not None

    def put(self, key: str, record: dict, synced: bool = True) -> None:
        """Write one record; relaxed (``synced=False``): on disk at the next ``sync()``."""
        self.db.put(key.encode(), json.dumps(record, default=str).encode(), self._options(synced))

    def _options(self, synced: bool) -> WriteOptions | None:
        """The write options of one write: the index's default (synced), or relaxed and counted for ``sync``."""
        if synced:
            return None
        self._writes += 1
        return self._relaxed

    async def sync(self) -> None:
        """Return once every relaxed write made before the call is on disk.

        While one fsync runs, the callers that come wait for the next one,
        which covers them all (group commit): concurrent deliveries share
        an fsync instead of each holding the event loop for its own.
        """
        target = self._writes
        async with self._syncing:
            if self._synced >= target:
                return  # the fsync that just ended covered this caller's writes
            upto = self._writes
            await asyncio.to_thread(self.db.flush_wal, True)
            self._synced = upto

    def put_many(self, records: dict[str, dict], synced: bool = True) -> None:
        """One write for a whole batch; relaxed (``synced=False``): on disk at the next ``sync()``."""
        if not records:
            return
        batch = WriteBatch(raw_mode=True)
        for key, record in records.items():
            batch.put(key.encode(), json.dumps(record, default=str).encode())
        self.db.write(batch, self._options(synced))

    def delete_many(self, keys: list[str]) -> None:
        """One synced write for a whole batch of deletions."""
        if not keys:
            return
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key.encode())
        self.db.write(batch)

    def items(self) -> Iterator[tuple[str, dict]]:
        for key, raw in self.db.items():
            yield key.decode(), json.loads(raw)

    def close(self) -> None:
        self.db.close()

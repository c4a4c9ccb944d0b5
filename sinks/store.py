"""A small durable index (RocksDB via rocksdict) of JSON records by message id.

Writes are synchronous (fsynced WAL): a sink commits its Kafka offset only
after the record is on disk, so a power cut never loses what the offset says
was handled. The CLI opens the same index read-only beside a running sink.

A write whose loss would only make an event go out again may be relaxed
(``put(..., synced=False)``): it is in the WAL at once (so a crash of the
process keeps it), and on disk at the next synced write of the same index,
since the WAL is written in order. A synced write cost 236 us of wall time,
113 us of it CPU, against 8 us unsynced, on this machine's ext4; rocksdict
holds the GIL meanwhile, so the whole sink waits.
"""

from __future__ import annotations

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

    def get(self, key: str) -> dict | None:
        raw = self.db.get(key.encode())
        return None if raw is None else json.loads(raw)

    def __contains__(self, key: str) -> bool:
        return self.db.get(key.encode()) is not None

    def put(self, key: str, record: dict, synced: bool = True) -> None:
        """Write one record; ``synced=False`` only where losing it to a power cut re-sends an event, no more."""
        value = json.dumps(record, default=str).encode()
        self.db.put(key.encode(), value, None if synced else self._relaxed)

    def put_many(self, records: dict[str, dict]) -> None:
        """One synced write for a whole batch."""
        if not records:
            return
        batch = WriteBatch(raw_mode=True)
        for key, record in records.items():
            batch.put(key.encode(), json.dumps(record, default=str).encode())
        self.db.write(batch)

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

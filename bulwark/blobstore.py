"""Content-addressed store for raw messages (the claim check).

A message is stored under the sha256 of its bytes, written to a temporary
file, fsynced, renamed into place and the directory fsynced (and any
directory it created, into its parent): after ``put``
returns, the message survives a power cut. Storing the same bytes twice is a
no-op, which makes a client's retry after a 451 harmless.

Blobs are never deleted by the pipeline: forensics replays read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The blob store's own threads: a 250 waits on a put, so nothing else that
#: runs in threads (Argon2 during an AUTH flood, a slow directory bind) may
#: queue in front of it.
_IO = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blobstore")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and any missing parents, each new entry fsynced into its
    parent: a rename into a directory whose own entry never reached the disk
    can vanish with it in a power cut."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # a concurrent put made it
            continue
        _fsync_dir(directory.parent)


class BlobStoreError(OSError):
    pass


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("not a sha256 hex digest")
        return self.root / digest[:2] / digest[2:4] / digest

    def put_sync(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.exists():
            return digest
        try:
            _makedirs_durable(final.parent)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(final.parent)
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"blob store {self.root} cannot store: {exc.strerror}") from None
        return digest

    def get_sync(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobStoreError(f"blob {digest} is corrupt (content does not match its digest)")
        return data

    async def put(self, data: bytes) -> str:
        return await asyncio.get_running_loop().run_in_executor(_IO, self.put_sync, data)

    async def get(self, digest: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(_IO, self.get_sync, digest)

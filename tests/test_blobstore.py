"""The blob store: content-addressed, durable, idempotent, and loud when it cannot write."""

from __future__ import annotations

import hashlib

import pytest

from bulwark.blobstore import BlobStore, BlobStoreError


def test_stored_under_its_sha256_and_read_back(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put_sync(b"Subject: hi\r\n\r\nhello\r\n")
    assert digest == hashlib.sha256(b"Subject: hi\r\n\r\nhello\r\n").hexdigest()
    assert store.get_sync(digest) == b"Subject: hi\r\n\r\nhello\r\n"
    assert store.path(digest).relative_to(tmp_path).parts[:2] == (digest[:2], digest[2:4])


def test_storing_the_same_message_twice_is_a_no_op(tmp_path):
    store = BlobStore(tmp_path)
    assert store.put_sync(b"same") == store.put_sync(b"same")
    assert not list(tmp_path.rglob(".incoming-*"))


def test_an_unwritable_store_raises_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BlobStoreError, match="cannot store"):
        BlobStore(blocker / "blobs").put_sync(b"x")


def test_a_corrupted_blob_is_detected(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put_sync(b"original")
    store.path(digest).write_bytes(b"tampered")
    with pytest.raises(BlobStoreError, match="corrupt"):
        store.get_sync(digest)


def test_digests_are_validated_before_touching_the_disk(tmp_path):
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path("../../etc/passwd")


def test_every_directory_a_put_creates_is_fsynced_into_its_parent(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    root = tmp_path / "blobs"
    root.mkdir()
    digest = BlobStore(root).put_sync(b"a new message")
    leaf = root / digest[:2] / digest[2:4]
    # The root gained aa/, aa/ gained bb/, bb/ gained the blob: each entry made durable.
    for directory in (root, root / digest[:2], leaf):
        assert str(directory) in synced, (directory, synced)


@pytest.mark.asyncio
async def test_an_auth_flood_does_not_queue_in_front_of_blob_writes(tmp_path, monkeypatch):
    import asyncio
    import threading

    from ingest import accounts

    release = threading.Event()

    def slow_verify(hash_, password):  # an Argon2 verification that takes as long as we say
        release.wait(10)
        return False

    monkeypatch.setattr(accounts, "verify_password", slow_verify)
    directory = accounts.AccountDirectory.__new__(accounts.AccountDirectory)
    directory.get = lambda login: None
    flood = [asyncio.create_task(directory.authenticate(f"guess{i}@example.test", "pw")) for i in range(40)]
    await asyncio.sleep(0.1)
    try:
        # Every default worker thread would be busy with the flood; the blob store has its own.
        digest = await asyncio.wait_for(BlobStore(tmp_path).put(b"a message during the flood"), 10)
        assert digest and sum(not t.done() for t in flood) == 40
    finally:
        release.set()
        await asyncio.gather(*flood)

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

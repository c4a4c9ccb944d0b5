"""The content agent's handling of the blob store: a message answered 250 is
never judged on bytes that are missing for a while, and never lost."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from bulwark.blobstore import BlobStore
from bulwark.policy import Policy
from schemas import codec
from schemas import events as ev
from streams.app import _judge_and_publish, judge

RAW = b"From: a@partner.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello.\r\n"
POLICY = Policy.model_validate({
    "hostname": "gw.example.test", "local_domains": ["example.test"],
    "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
    "checks": {"antivirus": {"enabled": False}, "macros": {"enabled": False}, "outbreak": {"enabled": False}},
})


def received(digest: str) -> ev.MessageReceived:
    return ev.MessageReceived(
        message_id="m1", session_id="s1", direction="inbound",
        envelope=ev.Envelope(mail_from="a@partner.test", rcpt_to=["b@example.test"], sha256=digest, size=len(RAW),
                             client_ip="192.0.2.1", received_at=datetime.now(timezone.utc)))


class Verdicts:
    """Stands in for the Faust topic: records what was sent."""

    def __init__(self):
        self.sent = []

    async def send(self, key, value, headers, timestamp):
        self.sent.append(codec.decode(value, headers))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


@pytest.mark.asyncio
async def test_a_blob_that_cannot_be_read_yet_is_retried_not_quarantined(tmp_path):
    import hashlib

    blobs = BlobStore(tmp_path / "blobs")
    event = received(hashlib.sha256(RAW).hexdigest())
    with pytest.raises(FileNotFoundError):
        await judge(event, blobs, POLICY)  # an infrastructure failure, not a verdict

    verdicts = Verdicts()
    judging = asyncio.create_task(_judge_and_publish(event, blobs, POLICY, verdicts))
    await asyncio.sleep(0.2)
    assert verdicts.sent == []  # still trying, nothing decided
    await blobs.put(RAW)  # the store is back (a remounted volume, say)
    verdict = await asyncio.wait_for(judging, 30)
    assert [v.action for v in verdicts.sent] == ["deliver"] and verdict.action == "deliver"


@pytest.mark.asyncio
async def test_a_corrupt_blob_is_held_for_a_person(tmp_path):
    import hashlib

    blobs = BlobStore(tmp_path / "blobs")
    digest = await blobs.put(RAW)
    blobs.path(digest).write_bytes(RAW.replace(b"Hello", b"Jello"))  # not the message that was accepted
    verdict = await judge(received(hashlib.sha256(RAW).hexdigest()), blobs, POLICY)
    assert verdict.action == "quarantine" and verdict.reasons == ["MESSAGE_UNREADABLE"]

"""Content stage: verdicts per second with every enabled check, 10 KB messages.

The Faust worker runs as in production; the benchmark stores messages in the
blob store and commits their message.received events straight to Kafka (so
ingest's speed is not measured here), then times until every verdict is on
mail.verdicts. Once with plain 10 KB messages, once with a 10 KB message
carrying a small ZIP and a PDF-named attachment. The messages are outbound
(a local sender relayed by the domain mail server), so Data Leak Prevention,
whose rules read outbound mail by default, runs on every one of them too.
"""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
from email.message import EmailMessage

from aiokafka import AIOKafkaConsumer

from bench._stack import local_stack
from bulwark.blobstore import BlobStore
from bulwark.kafka import EventPublisher, make_producer
from bulwark.kafka_security import aiokafka_options
from schemas import events as ev
from schemas.events import new_id, utcnow
from schemas.topics import VERDICTS

POLICY = """
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {name: sink, host: 127.0.0.1, port: 9, default: true, trusted_addresses: [127.0.0.10/32]}
"""

COUNT = 300


def _message(i: int, attachments: bool) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.test", "b@partner.test", f"bench {i}"
    msg.set_content(("The quarterly figures are attached. " * 2 + "\n") * 130)
    if attachments:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("notes.txt", "nothing to see here\n" * 50)
        msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="notes.zip")
        msg.add_attachment(b"%PDF-1.4\n%fake\n" * 20, maintype="application", subtype="pdf", filename="q3.pdf")
    return msg.as_bytes()


async def _run_once(settings, attachments: bool, count: int = COUNT) -> float:
    blobs = BlobStore(settings.blob_dir)
    events = []
    for i in range(count):
        raw = _message(i, attachments)
        digest = blobs.put_sync(raw)
        envelope = ev.Envelope(mail_from="a@example.test", rcpt_to=["b@partner.test"], sha256=digest,
                               size=len(raw), client_ip="127.0.0.10", received_at=utcnow())
        events.append(ev.MessageReceived(message_id=new_id(), session_id=new_id(), envelope=envelope,
                                         direction="outbound"))
    wanted = {e.message_id.encode() for e in events}

    consumer = AIOKafkaConsumer(VERDICTS.name, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="latest", isolation_level="read_committed",
                                group_id=f"bench-{new_id()}", **aiokafka_options(settings))
    await consumer.start()
    await consumer.getmany(timeout_ms=1000)  # join and position at the end before producing
    publisher = EventPublisher(make_producer(settings, "bench"))
    await publisher.start()
    started = time.perf_counter()
    await asyncio.gather(*(publisher.publish(e) for e in events))
    while wanted:
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            for record in records:
                wanted.discard(record.key)
        if time.perf_counter() - started > 300:
            raise TimeoutError(f"{len(wanted)} verdicts missing after 300s")
    elapsed = time.perf_counter() - started
    await publisher.stop()
    await consumer.stop()
    return count / elapsed


def run() -> None:
    with local_stack(POLICY, components=("streams",)) as (settings, _):
        # The worker's first assignment and first transaction take seconds:
        # start-up, not throughput.
        asyncio.run(_run_once(settings, False, count=5))
        for attachments in (False, True):
            rate = asyncio.run(_run_once(settings, attachments))
            label = "with attachments" if attachments else "plain"
            print(f"{COUNT} outbound messages of ~10 KB (DLP on), {label:16}: {rate:7.1f} verdicts/s", flush=True)

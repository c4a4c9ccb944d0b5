"""Trace: one message among a million records, through the trace index and by scanning the topics.

Writes RECORDS records (by default a million: 100,000 messages of ten
records each, six on smtp.sessions and four on the message topics) with
confluent-kafka's batching producer, starts the trace indexer, times how
long it takes to catch up, then times tracing one message (and one client
address, and one account) through the index, and the same message by
scanning the topics as ``bulwark trace`` did before the index (and still
does when there is none).

    python -m bench trace_index              # a million records
    python -m bench.trace_index 200000       # fewer
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime, timezone

import confluent_kafka

from bench._stack import local_stack
from bulwark import trace_index as ix
from bulwark.kafka import producer_config
from bulwark.trace import Index, scan_trace
from schemas import codec
from schemas import events as ev
from schemas.topics import BY_NAME, record_key, topic_for

POLICY = """
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {name: sink, host: 127.0.0.1, port: 9, default: true}
"""

RECORDS = 1_000_000
PER_MESSAGE = 10

MID = "MSGID0000000000"
SID = "SESSID000000000"
IP = "198.51.100.250"
SENDER = "sender00000@partner.test"


def _templates() -> list[tuple[str, bytes, bytes, list]]:
    """One message's ten records, with placeholders for its ids, address and sender."""
    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    envelope = ev.Envelope(mail_from=SENDER, rcpt_to=["rcpt@example.test"], sha256="ab" * 32, size=2048,
                           client_ip=IP, received_at=at)
    common = dict(session_id=SID, client_ip=IP, occurred_at=at)
    events = [
        ev.SessionConnected(**common, client_port=40000, server_port=25, listener="inbound"),
        ev.SessionEhlo(**common, hostname="client.partner.test", esmtp=True),
        ev.SessionMail(**common, sender=SENDER, accepted=True, reply_code=250),
        ev.SessionRcpt(**common, recipient="rcpt@example.test", accepted=True, reply_code=250),
        ev.SessionData(**common, message_id=MID, accepted=True, reply_code=250, size=2048),
        ev.SessionDisconnected(**common, duration_seconds=0.2, messages_accepted=1),
        ev.MessageReceived(message_id=MID, session_id=SID, envelope=envelope, direction="inbound", occurred_at=at),
        ev.Verdict(message_id=MID, session_id=SID, action="deliver", results=[], policy_version="bench",
                   envelope=envelope, direction="inbound", occurred_at=at),
        ev.DeliveryQueued(message_id=MID, recipients=["rcpt@example.test"], source="verdict", occurred_at=at),
        ev.DeliveryAttempted(message_id=MID, attempt=1, server="127.0.0.1:25", occurred_at=at,
                             recipients=[ev.RecipientResult(recipient="rcpt@example.test", outcome="delivered",
                                                            reply_code=250)]),
    ]
    out = []
    for event in events:
        spec = topic_for(type(event))
        value, headers = codec.encode(event)
        out.append((spec.name, record_key(spec, event), value, headers))
    return out


def _ids(n: int) -> tuple[bytes, bytes, bytes, bytes]:
    return (f"MSGID{n:010d}".encode(), f"SESSID{n:09d}".encode(),
            f"198.51.{100 + n % 50}.{n // 50 % 250}".encode(), f"sender{n % 100000:05d}@partner.test".encode())


def produce(settings, messages: int, start_ms: int) -> float:
    producer = confluent_kafka.Producer(producer_config(settings, "bench-trace", **{
        "linger.ms": 50, "batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
    }))
    templates = _templates()
    began = time.perf_counter()
    for n in range(messages):
        mid, sid, ip, sender = _ids(n)
        stamp = start_ms + n * 10
        for topic, key, value, headers in templates:
            value = (value.replace(MID.encode(), mid).replace(SID.encode(), sid).replace(IP.encode(), ip)
                     .replace(SENDER.encode(), sender))
            key = key.replace(MID.encode(), mid).replace(IP.encode(), ip)
            while True:
                try:
                    producer.produce(topic, value=value, key=key, headers=headers, timestamp=stamp)
                    break
                except BufferError:
                    producer.poll(0.05)
        if n % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} records not delivered")
    return time.perf_counter() - began


def _ends(settings) -> dict[tuple[str, int], int]:
    consumer = ix.reader(settings, "bench-trace-ends")
    try:
        return {(t, p): consumer.get_watermark_offsets(confluent_kafka.TopicPartition(t, p), timeout=10)[1]
                for t in ix.INDEXED_TOPICS for p in range(BY_NAME[t].partitions)}
    finally:
        consumer.close()


def wait_for_index(settings, timeout: float = 600) -> float:
    ends = {k: v for k, v in _ends(settings).items() if v}
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        store = ix.IndexStore.open_read_only(settings)
        if store is not None:
            try:
                positions = store.positions()
            finally:
                store.close()
            if all(positions.get(k, 0) >= v for k, v in ends.items()):
                return time.perf_counter() - began
        time.sleep(0.5)
    raise TimeoutError("the index did not catch up")


def _timed(fn, *args):
    began = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - began, result


def _via_index(settings, fn_name: str, *args):
    index = Index.open(settings)
    try:
        assert not index.scanned
        return getattr(index, fn_name)(*args)
    finally:
        index.close()


def run(records: int = RECORDS) -> None:
    messages = records // PER_MESSAGE
    with local_stack(POLICY, components=()) as (settings, stack):
        start_ms = int(time.time() * 1000) - messages * 10
        seconds = produce(settings, messages, start_ms)
        total = messages * PER_MESSAGE
        print(f"  wrote {total:,} records ({messages:,} messages) in {seconds:.1f}s "
              f"({total / seconds:,.0f} records/s, confluent-kafka, batched)", flush=True)
        stack.start("trace-index", ["sinks", "trace-index"])
        caught_up = wait_for_index(settings)
        print(f"  the indexer read all {total:,} in {caught_up:.1f}s ({total / caught_up:,.0f} records/s)",
              flush=True)
        time.sleep(2)  # idle, the indexer moves its write-ahead log into table files (what a reader replays)
        target = messages // 2 + 7
        mid, _, ip, sender = (x.decode() for x in _ids(target))

        for attempt in range(3):
            seconds, found = _timed(_via_index, settings, "trace", mid)
            print(f"  trace {mid} through the index: {seconds * 1000:.0f} ms ({len(found)} records)"
                  + (" (first call: connections)" if attempt == 0 else ""), flush=True)
        assert len(found) == PER_MESSAGE, [r.event.TYPE for r in found]
        seconds, sessions = _timed(_via_index, settings, "sessions_from", ip, None, None)
        print(f"  trace --client-ip {ip} (all time) through the index: {seconds * 1000:.0f} ms "
              f"({len(sessions)} sessions, {sum(len(s.records) for s in sessions)} records)", flush=True)
        seconds, timelines = _timed(_via_index, settings, "account", sender, None, None)
        print(f"  trace --account {sender} through the index: {seconds * 1000:.0f} ms "
              f"({len(timelines)} timelines)", flush=True)

        stack.stop("trace-index")
        seconds, found = _timed(lambda: asyncio.run(scan_trace(settings, mid)))
        assert len(found) == PER_MESSAGE
        print(f"  trace {mid} by scanning the topics (bulwark trace without the index): {seconds:.1f}s", flush=True)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else RECORDS)

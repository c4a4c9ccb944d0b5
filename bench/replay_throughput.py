"""Replay: recorded verdicts read and filtered per second (the issue's target: at least 50,000).

Writes RECORDS verdicts (500,000 by default; each about 1.3 KB of JSON, with
two check results) to mail.verdicts with confluent-kafka's batching producer,
then times ``bulwark replay``'s reading step (``bulwark.replay.select``):
consuming alone (the ceiling of the client on this machine), a filter that
selects one sender's few messages, a client address and an action that
select a tenth (each of those parsed), and a time range and an action that
select a tenth of the newer half. Judging the selected messages
again is not timed here: that is the content checks' own speed
(bench/content_throughput.py).

    python -m bench replay_throughput
    python -m bench.replay_throughput 200000
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import confluent_kafka

from bench._stack import local_stack
from bulwark.kafka import producer_config
from bulwark.replay import ReadStats, Selection, _reader, select
from schemas import codec
from schemas import events as ev
from schemas.topics import VERDICTS, record_key

POLICY = """
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {name: sink, host: 127.0.0.1, port: 9, default: true}
"""

RECORDS = 500_000
MID = "MSGID0000000000"
SENDER = "sender00000@partner.test"


def produce(settings, count: int, start_ms: int) -> float:
    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    envelope = ev.Envelope(mail_from=SENDER, rcpt_to=["rcpt@example.test"], sha256="ab" * 32, size=2048,
                           client_ip="198.51.100.7", received_at=at)
    results = [ev.CheckResult(check="attachment_type", name="ATTACHMENT_TYPE_OK", outcome="pass"),
               ev.CheckResult(check="antivirus", name="ANTIVIRUS_OK", outcome="pass", version="ClamAV 1.4.3/27000")]
    templates = {}
    for action in ("deliver", "quarantine"):
        verdict = ev.Verdict(message_id=MID, session_id="s", action=action, results=results, policy_version="bench",
                             envelope=envelope, direction="inbound", occurred_at=at,
                             reasons=[] if action == "deliver" else ["ATTACHMENT_TYPE_BLOCKED"])
        value, headers = codec.encode(verdict)
        templates[action] = (value, headers, record_key(VERDICTS, verdict))
    producer = confluent_kafka.Producer(producer_config(settings, "bench-replay", **{
        "linger.ms": 50, "batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
    }))
    began = time.perf_counter()
    for n in range(count):
        value, headers, key = templates["quarantine" if n % 10 == 0 else "deliver"]
        mid = f"MSGID{n:010d}".encode()
        sender = f"sender{n % 50000:05d}@partner.test".encode()
        value = value.replace(MID.encode(), mid).replace(SENDER.encode(), sender)
        while True:
            try:
                producer.produce(VERDICTS.name, value=value, key=mid, headers=headers, timestamp=start_ms + n)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 1000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("records not delivered")
    return time.perf_counter() - began


def raw_read(settings) -> tuple[int, float]:
    """Every record consumed and nothing done with it: the ceiling of this client on this machine."""
    consumer = _reader(settings)
    began = time.perf_counter()
    count, open_partitions = 0, set(range(VERDICTS.partitions))
    consumer.assign([confluent_kafka.TopicPartition(VERDICTS.name, p, confluent_kafka.OFFSET_BEGINNING)
                     for p in open_partitions])
    while open_partitions:
        for msg in consumer.consume(num_messages=10000, timeout=1.0):
            if msg.error() is None:
                count += 1
            elif msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                open_partitions.discard(msg.partition())
    seconds = time.perf_counter() - began
    consumer.close()
    return count, seconds


def timed(settings, selection: Selection) -> ReadStats:
    stats = ReadStats()
    select(settings, selection, stats)
    return stats


def run(records: int = RECORDS) -> None:
    with local_stack(POLICY, components=()) as (settings, _stack):
        start_ms = int(time.time() * 1000) - records
        seconds = produce(settings, records, start_ms)
        print(f"  wrote {records:,} verdicts in {seconds:.1f}s ({records / seconds:,.0f}/s)", flush=True)
        timed(settings, Selection.of(senders=["nobody@nowhere.test"]))  # warm: connections, page cache
        count, seconds = raw_read(settings)
        print(f"  consumed alone (no parsing, no filter): {count:,} in {seconds:.2f}s: "
              f"{count / seconds:,.0f} records/s", flush=True)
        stats = timed(settings, Selection.of(senders=["sender00042@partner.test"]))
        print(f"  --sender (one in 50,000): read and filtered {stats.read:,} in {stats.seconds:.2f}s: "
              f"{stats.per_second:,.0f} events/s, {stats.selected} selected", flush=True)
        stats = timed(settings, Selection.of(client_ips=["198.51.100.7"], actions=["quarantine"]))
        print(f"  --client-ip --action quarantine (a tenth, each parsed): read and filtered {stats.read:,} in "
              f"{stats.seconds:.2f}s: {stats.per_second:,.0f} events/s, {stats.selected:,} selected", flush=True)
        since = datetime.fromtimestamp((start_ms + records // 2) / 1000, timezone.utc)
        stats = timed(settings, Selection.of(since=since, actions=["quarantine"]))
        print(f"  --since (the newer half) --action quarantine: read and filtered {stats.read:,} in "
              f"{stats.seconds:.2f}s: {stats.per_second:,.0f} events/s, {stats.selected:,} selected", flush=True)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else RECORDS)

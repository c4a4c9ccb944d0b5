"""The Faust app: one app object, its topics, tables and agents.

The content agent consumes ``mail.received``, loads each message from the
blob store, runs the enabled checks and publishes one verdict per message to
``mail.verdicts``. Records are raw bytes decoded by ``schemas.codec``, so the
events are defined once, in ``schemas/``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta

import faust

from bulwark.blobstore import BlobStore
from bulwark.policy import Policy, load
from bulwark.settings import Settings
from schemas import codec
from schemas.events import CheckResult, MessageReceived
from schemas.topics import RECEIVED, VERDICTS, TopicSpec, record_key
from streams.checks import run_checks
from streams.message import Message
from streams.verdict import decide

log = logging.getLogger(__name__)

#: How long the content agent remembers that it judged a message. A record is
#: redelivered after a crash within seconds or minutes; a day is ample.
JUDGED_WINDOW = timedelta(days=1)


def _raw_topic(app: faust.App, spec: TopicSpec) -> faust.TopicT:
    return app.topic(
        spec.name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions,
    )


def _headers(headers) -> list[tuple[str, bytes]]:
    items = headers.items() if hasattr(headers, "items") else (headers or [])
    return [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in items]


async def judge(event: MessageReceived, blobs: BlobStore, policy: Policy):
    """The verdict for one received message."""
    try:
        raw = await blobs.get(event.envelope.sha256)
    except OSError as exc:
        # Without the bytes nothing can be checked or delivered: hold it.
        message = Message(event.message_id, event.session_id, event.envelope, event.direction, b"", policy)
        failed = CheckResult(check="blobstore", name="MESSAGE_UNREADABLE", outcome="fail", detail=str(exc))
        return decide(message, [failed], policy)
    message = Message(event.message_id, event.session_id, event.envelope, event.direction, raw, policy)
    return decide(message, await run_checks(message, policy), policy)


async def _judge_and_publish(event: MessageReceived, blobs: BlobStore, policy: Policy, verdicts: faust.TopicT):
    """Judge and publish, retrying until it works.

    Faust acknowledges a record whose agent crashed, so an exception escaping
    here would lose a message that was answered 250. Checks never raise (a
    failed check is a result); what can fail is the infrastructure, and for
    that the only safe answer is to wait and try again.
    """
    backoff = 0.5
    while True:
        try:
            verdict = await judge(event, blobs, policy)
            value, headers = codec.encode(verdict)
            sent = await verdicts.send(
                key=record_key(VERDICTS, verdict),
                value=value,
                headers=headers,
                timestamp=verdict.occurred_at.timestamp(),
            )
            # Wait for the broker's ack before this record counts as
            # processed (and its offset may be committed).
            await sent
            return verdict
        except Exception:
            log.exception("could not judge message %s; retrying in %.1fs", event.message_id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)


def build_app(settings: Settings, policy: Policy | None = None) -> faust.App:
    policy = policy or load(settings.policy_path)
    blobs = BlobStore(settings.blob_dir)
    app = faust.App(
        "bulwark-streams",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="rocksdb://",
        datadir=str(settings.data_dir / "streams"),
        autodiscover=False,
        web_host="127.0.0.1",
        web_port=settings.streams_web_port,
        web_bind="127.0.0.1",
        topic_replication_factor=1,
        topic_partitions=RECEIVED.partitions,
        producer_acks=-1,
        # Exactly-once: verdicts and table updates are committed in the same
        # transaction as the consumed offsets, and the consumer reads only
        # committed records (ingest's mail.received is transactional).
        processing_guarantee="exactly_once",
        consumer_auto_offset_reset="earliest",
        # The leader topic would need auto-creation; Bulwark has no leader-only timers.
        topic_disable_leader=True,
    )
    received = _raw_topic(app, RECEIVED)
    verdicts = _raw_topic(app, VERDICTS)

    # Message ids already judged, in event-time windows, so a record
    # redelivered after a crash does not produce a second verdict.
    # (JSON keys: a windowed key is a (key, window) pair, which the raw
    # serializer cannot store.)
    judged = app.Table(
        "content-judged",
        default=str,
        partitions=RECEIVED.partitions,
        key_type=str,
        value_type=str,
    ).tumbling(JUDGED_WINDOW, expires=2 * JUDGED_WINDOW)

    @app.agent(received, concurrency=4)
    async def content(stream):
        async for record in stream.events():
            try:
                event = codec.decode(record.value, _headers(record.headers))
            except (codec.UnknownEvent, ValueError) as exc:
                log.error("skipping a record on %s: %s", RECEIVED.name, exc)
                continue
            if not isinstance(event, MessageReceived):
                continue
            key = event.message_id
            if judged[key].current():
                log.info("message %s already judged; not judging twice", event.message_id)
                continue
            verdict = await _judge_and_publish(event, blobs, policy, verdicts)
            judged[key] = verdict.event_id
            log.info("message %s: %s %s", event.message_id, verdict.action, ",".join(verdict.reasons))

    app.bulwark_agents = {"content": content}  # type: ignore[attr-defined]

    # Outbreak Protection: fingerprints counted across senders (streams/outbreak.py).
    from streams import outbreak

    app.bulwark_agents.update(outbreak.register(app, settings, received, blobs, lambda: policy))  # type: ignore[attr-defined]
    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    app = build_app(settings)
    sys.argv = ["bulwark-streams", "worker", "--loglevel", loglevel, "--without-web"]
    app.main()


async def declare_internal_topics(settings: Settings) -> list[str]:
    """Create the changelog topics of every Faust table before any worker starts.

    A worker that creates them itself on a fresh cluster keeps a metadata
    cache without them, and its tables fail with "changelog has 0
    partitions" until the cache expires (minutes). `bulwark topics ensure`
    calls this, so the topics exist before the first worker looks.
    """
    app = build_app(settings)
    await app.maybe_start_producer()
    try:
        names = []
        for table in app.tables.values():
            await table.changelog_topic.maybe_declare()
            names += list(table.changelog_topic.topics)
        return names
    finally:
        await app.producer.stop()

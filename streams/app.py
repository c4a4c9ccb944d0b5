"""The Faust app: one app object, its topics, tables and agents.

The content agent consumes ``mail.received``, loads each message from the
blob store, runs the enabled checks and publishes one verdict per message to
``mail.verdicts``. Records are raw bytes decoded by ``schemas.codec``, so the
events are defined once, in ``schemas/``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import faust

from bulwark import metrics
from bulwark.blobstore import BlobStore, BlobStoreError
from bulwark.kafka_security import faust_credentials
from bulwark.policy import Policy
from bulwark.policy.runtime import PolicyHolder
from bulwark.settings import Settings
from schemas import codec
from schemas.acl import STREAMS_APP_ID
from schemas.events import CheckResult, MessageReceived
from schemas.topics import RECEIVED, VERDICTS, TopicSpec, record_key
from streams import transport
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
    except BlobStoreError as exc:
        # The bytes are there but are not the message that was accepted
        # (their digest differs): no retry brings it back, so hold it for a
        # person. A blob that cannot be read at all (missing mount, I/O
        # error) raises on: an infrastructure failure, retried until it
        # reads, because ingest made it durable before its 250.
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
            try:
                sent = await verdicts.send(
                    key=record_key(VERDICTS, verdict),
                    value=value,
                    headers=headers,
                    timestamp=verdict.occurred_at.timestamp(),
                )
                # Wait for the broker's ack before this record counts as
                # processed (and its offset may be committed).
                await sent
            except Exception:
                metrics.event_published(VERDICTS.name, verdict.TYPE, ok=False)
                raise
            metrics.event_published(VERDICTS.name, verdict.TYPE)
            metrics.VERDICTS.labels(action=verdict.action).inc()
            return verdict
        except Exception:
            log.exception("could not judge message %s; retrying in %.1fs", event.message_id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)


#: How often the worker's consumer lag is measured.
LAG_EVERY_SECONDS = 5.0


async def record_lag(app: faust.App) -> dict[str, int]:
    """Set the consumer-lag gauge of each topic this worker consumes: records it has not fetched yet.

    Per active partition, the end offset (the high watermark of the last
    fetch) less the consumer's position, both asked of Faust's consumer
    thread from what it already knows (no request to the broker). Not the committed offset: ingest writes ``mail.received`` in
    transactions, and the commit marker that ends each one takes an offset
    no record ever commits past, so a partition at rest would show a lag of
    one. Table changelogs are left out: the worker writes them, it does not
    consume them.
    """
    consumer = app.consumer
    changelogs = set(app.tables.changelog_topics)
    partitions = [tp for tp in app.assignor.assigned_actives() & consumer.assignment()
                  if tp.topic not in changelogs]
    ends = await consumer.highwaters(*partitions) if partitions else {}
    lag: dict[str, int] = {}
    for tp in partitions:
        end = ends.get(tp)
        try:
            position = await consumer.position(tp)
        except Exception:  # revoked meanwhile (a rebalance): another worker reports it
            continue
        if end is None or end < 0 or position is None:  # nothing fetched from it yet
            continue
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - position)
    known = getattr(app, "bulwark_lag_topics", set()) | set(lag)
    app.bulwark_lag_topics = known  # type: ignore[attr-defined]
    for topic in known:  # a partition moved to another worker: its lag is that worker's now
        metrics.CONSUMER_LAG.labels(group=app.conf.id, topic=topic).set(lag.get(topic, 0))
    return lag


def advertised_web_host(listen: str) -> str:
    """The host in a worker's canonical URL when its web server listens on ``listen``."""
    return "127.0.0.1" if listen in ("", "0.0.0.0", "::") else listen


def build_app(settings: Settings, policy: Policy | None = None) -> faust.App:
    # Follows config.policy (or stays on the given policy, in unit tests).
    holder = PolicyHolder.fixed(policy) if policy is not None else PolicyHolder(settings=settings)
    blobs = BlobStore(settings.blob_dir)
    app = faust.App(
        STREAMS_APP_ID,
        # Faust's Kafka driver, reading committed records only (streams/transport.py).
        broker=f"{transport.SCHEME}://{settings.kafka_bootstrap}",
        # SASL_SSL with this worker's principal in the secure profile (bulwark/kafka_security.py).
        broker_credentials=faust_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.streams_dir),
        autodiscover=False,
        # web_host is the address this worker advertises to the others (its
        # canonical URL), so never a wildcard; in a container the worker
        # listens on every interface and routes to itself over loopback.
        web_host=advertised_web_host(settings.streams_web_host),
        web_port=settings.streams_web_port,
        web_bind=settings.streams_web_host,
        topic_replication_factor=1,
        topic_partitions=RECEIVED.partitions,
        producer_acks=-1,
        # A few milliseconds of linger: the table changelogs, fingerprints and
        # verdicts of concurrent messages share produce requests instead of
        # each record costing the broker a request of its own (measured with
        # bench/e2e_relay.py; docs/performance.md).
        producer_linger=0.005,
        # At-least-once, with every effect idempotent: Faust flushes the
        # table changelogs and waits for the sends before it commits an
        # offset, and a record delivered again changes nothing (counters:
        # streams/once.py; verdicts: the content-judged table, and the sinks
        # key their work by message id). Faust's exactly_once loses and
        # doubles counts when partitions move between workers (once.py says
        # why), so it is not used.
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        # A worker that dies is noticed by the group after this long, and its
        # keys move to the others. Faust's default is 60 s, all that time
        # without bans or limits for those keys. Heartbeats come from the
        # consumer's own thread every 3 s, so a busy agent does not miss
        # them.
        broker_session_timeout=15,
        # The leader topic would need auto-creation; Bulwark has no leader-only timers.
        topic_disable_leader=True,
    )
    from streams import web

    # Before any view is added (the first creates the aiohttp application):
    # certificate reloading and Location Screening for every request.
    app.conf.web_application_options = {"middlewares": web.middlewares(app, holder)}
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

    # Message ids being judged on this worker now. The agent runs four at a
    # time, so copies of one record read together (the safety net's
    # re-sends, sinks/unjudged.py) would each find the judged table empty
    # and each be judged. A copy read while its message is being judged is
    # skipped; its offset is not committed before the original's, which is
    # earlier on the same partition.
    judging: set[str] = set()

    @app.agent(received, concurrency=4)
    async def content(stream):
        # Started here, in the worker's own event loop, and before the first
        # verdict: a verdict must never be made under a stale policy.
        await holder.start()
        async for record in stream.events():
            try:
                event = codec.decode(record.value, _headers(record.headers))
            except (codec.UnknownEvent, ValueError) as exc:
                log.error("skipping a record on %s: %s", RECEIVED.name, exc)
                continue
            if not isinstance(event, MessageReceived):
                continue
            key = event.message_id
            if key in judging or judged[key].current():
                log.info("message %s already judged; not judging twice", event.message_id)
                continue
            judging.add(key)
            try:
                verdict = await _judge_and_publish(event, blobs, holder.current, verdicts)
                judged[key] = verdict.event_id
            finally:
                judging.discard(key)
            log.info("message %s: %s %s", event.message_id, verdict.action, ",".join(verdict.reasons))

    app.bulwark_agents = {"content": content}  # type: ignore[attr-defined]

    @app.timer(interval=LAG_EVERY_SECONDS)
    async def consumer_lag():
        await record_lag(app)

    app.bulwark_policy = holder  # type: ignore[attr-defined]

    # Outbreak Protection: fingerprints counted across senders (streams/outbreak.py).
    from streams import outbreak

    app.bulwark_agents.update(outbreak.register(app, settings, received, blobs, lambda: holder.current))  # type: ignore[attr-defined]

    # Dynamic Screening and Account Hijack Detection: windowed counters that
    # publish bans and account facts for ingest to enforce, and their tables
    # over HTTP.
    from schemas.topics import ACCOUNT_STATE, BANS, CONSOLE_LOGINS, HIJACK_LIMITS, SESSIONS
    from streams import hijack, screening

    sessions = _raw_topic(app, SESSIONS)
    app.bulwark_tables = {  # type: ignore[attr-defined]
        "screening": screening.install(app, holder, sessions, _raw_topic(app, BANS),
                                       _raw_topic(app, CONSOLE_LOGINS)),
        "hijack": hijack.install(app, holder, received, _raw_topic(app, ACCOUNT_STATE), _raw_topic(app, HIJACK_LIMITS)),
    }
    app.bulwark_internal_topics = [app.bulwark_tables["hijack"]["account_messages"]]  # type: ignore[attr-defined]
    web.install(app, app.bulwark_tables, sessions)
    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    from streams import web

    app = build_app(settings)
    # The web server serves the tables (streams/web.py) over HTTPS on
    # 127.0.0.1 at BULWARK_STREAMS_WEB_PORT (build_app sets host and port);
    # give each worker on a host its own port. No --web-host/--web-port here:
    # Faust's worker command would reset the canonical URL to http://.
    web.serve_https(app, settings)
    # Prometheus metrics on a port of their own (plain HTTP, like every
    # component's), not on the HTTPS table views: no certificate to scrape.
    metrics.start("streams", settings)
    sys.argv = ["bulwark-streams", "worker", "--loglevel", loglevel]
    datadir = settings.streams_dir
    datadir.mkdir(parents=True, exist_ok=True)
    clean_stop = datadir / "clean-shutdown"
    if not clean_stop.exists() and Path(app.conf.tabledir).exists():
        # Faust writes table values to RocksDB as it processes, and their
        # changelog records a moment later. After a crash the local store
        # can hold updates that never reached the changelog: the worker
        # would take them for done when the records come again, and a
        # worker that later takes the partition over would never see them.
        # So after anything but a clean stop the tables are rebuilt from
        # their changelogs, the one copy every worker shares.
        log.warning("last stop was not clean: rebuilding the tables from their changelogs")
        shutil.rmtree(app.conf.tabledir)
    clean_stop.unlink(missing_ok=True)
    try:
        app.main()
    except SystemExit as exit:
        if exit.code in (0, None):
            clean_stop.touch()
        raise
    clean_stop.touch()


async def seed_worker_offsets(settings: Settings) -> list[str]:
    """Give the workers' consumer group an offset on every partition it consumes
    before any worker starts (bulwark/kafka.py, seed_group_offsets says why)."""
    from bulwark.kafka import seed_group_offsets

    app = build_app(settings)
    consumed = sorted({topic for agent in app.agents.values() for topic in agent.channel.topics})
    seeded = await seed_group_offsets(settings, app.conf.id, consumed)
    return sorted({tp.topic for tp in seeded})


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
        for topic in app.bulwark_internal_topics:  # the account repartition (streams/hijack.py)
            await topic.maybe_declare()
            names += list(topic.topics)
        return names
    finally:
        await app.producer.stop()

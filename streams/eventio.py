"""Bulwark events in and out of Faust agents (raw records, decoded by schemas.codec)."""

from __future__ import annotations

import logging

import faust

from bulwark import metrics
from schemas import codec
from schemas.events import Event
from schemas.topics import record_key, topic_for

log = logging.getLogger(__name__)


def headers_of(record) -> list[tuple[str, bytes]]:
    headers = record.headers
    items = headers.items() if hasattr(headers, "items") else (headers or [])
    return [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in items]


def decode_record(record) -> Event | None:
    """The event in a Faust record, or None (logged) for anything unreadable."""
    if record.value is None:  # a tombstone on a compacted topic
        return None
    try:
        return codec.decode(record.value, headers_of(record))
    except (codec.UnknownEvent, ValueError) as exc:
        log.error("skipping a record on %s: %s", record.message.topic, exc)
        return None


async def send_event(topic: faust.TopicT, event: Event, key: bytes | None = None,
                     headers: list[tuple[str, bytes]] = ()) -> None:
    """Publish an event from an agent and wait for the broker.

    Waiting means the event is on the topic before the record that caused it
    is acknowledged, so its offset is never committed ahead of the event
    (at-least-once: a crash can publish it twice, never zero times). The
    record timestamp is the event's own time, as everywhere in Bulwark.
    """
    value, codec_headers = codec.encode(event)
    # Counted under the topic it goes to: a repartition topic is not the event's own.
    name = topic.get_topic_name()
    try:
        sent = await topic.send(
            key=key if key is not None else record_key(topic_for(type(event)), event),
            value=value,
            headers=[*codec_headers, *headers],
            timestamp=event.occurred_at.timestamp(),
        )
        await sent
    except Exception:
        metrics.event_published(name, event.TYPE, ok=False)
        raise
    metrics.event_published(name, event.TYPE)

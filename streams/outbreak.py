"""Outbreak Protection: mass campaigns seen in this gateway's own traffic.

Two agents, because counting must be keyed by what is counted:

1. ``outbreak_observe`` reads every ``message.received`` (keyed by message
   id), fingerprints the message and publishes one ``outbreak.observed``
   event per fingerprint to ``outbreak.fingerprints``, keyed by fingerprint:
   a repartition, so every observation of one fingerprint reaches one worker.
2. ``outbreak_count`` keeps, per fingerprint, when each sender and client
   address was last seen, in event-time tumbling windows of the policy's
   width (this one and the one before are read: the last ``window`` minutes).
   When the distinct senders of that span reach the policy's threshold it records the outbreak in a global
   table (every worker holds all of it) and publishes ``outbreak.detected``
   to the compacted ``outbreak.alerts`` topic.

The ``outbreak`` check (streams/checks/outbreak.py) looks each message's
fingerprints up in that table: later messages carrying a marked fingerprint
are quarantined (or refused, per policy).

Fingerprints: the SHA-256 of each attachment; a fuzzy hash of the normalised
body text (lower case, digits and whitespace collapsed, URLs reduced to their
host); and a hash of the set of URL hosts.

The fuzzy hash has to be a Kafka key, so that every copy of a campaign is
counted by one worker. A similarity digest such as TLSH or ssdeep is
compared by distance, which needs a nearest-neighbour search and cannot be
a key. So the body is MinHashed (Broder, 1997) and the signature cut into
LSH bands (Leskovec, Rajaraman and Ullman, Mining of Massive Datasets,
section 3.4). Each band is a fingerprint of its own. Two bodies whose sets of
word 4-grams have Jaccard similarity s share at least one band with
probability 1 - (1 - s**4)**5: 0.99 at s = 0.9, 0.75 at 0.7, 0.04 at 0.3.
The copies of a campaign that changes names, amounts or a sentence per
recipient still meet under a common key, and unrelated mail almost never
does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from datetime import timedelta
from html.parser import HTMLParser

from bulwark import metrics
from streams.message import Message, UnreadableMessage

log = logging.getLogger(__name__)

#: Fingerprint -> outbreak record, for the outbreak check. Replaced by the
#: Faust global table when the worker builds its app; empty elsewhere.
ACTIVE: Mapping[str, dict] = {}

#: Shorter bodies say too little: "Thanks!" from many senders is not a campaign.
MIN_BODY_CHARS = 200
#: Smaller attachments (signatures, logos) are common to legitimate mail.
MIN_ATTACHMENT_BYTES = 512

_URL = re.compile(r"https?://([^\s/\"'<>?#]+)[^\s\"'<>]*", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self.hrefs: list[str] = []

    def handle_data(self, data):
        self.chunks.append(data)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "href" and value:
                self.hrefs.append(value)


def _body_text(message: Message) -> tuple[str, list[str]]:
    texts, urls = [], []
    for part in message.parts():
        if part.filename or not part.content_type.startswith("text/"):
            continue
        text = part.payload.decode("utf-8", "replace")
        if part.content_type == "text/html":
            parser = _Text()
            parser.feed(text)
            urls += [m.group(1).lower() for h in parser.hrefs for m in [_URL.match(h)] if m]
            text = " ".join(parser.chunks)
        urls += [m.group(1).lower() for m in _URL.finditer(text)]
        texts.append(text)
    return "\n".join(texts), urls


def normalise(text: str) -> str:
    text = _URL.sub(lambda m: m.group(1).lower(), text.lower())
    text = _DIGITS.sub("0", text)
    return _SPACE.sub(" ", text).strip()


#: MinHash-LSH parameters (see the module docstring): word 4-grams, 5 bands of 4 rows.
SHINGLE_WORDS = 4
BANDS, ROWS = 5, 4
#: A campaign's identity is in its first pages; longer bodies are cut here.
MAX_BODY_CHARS = 20_000
_HASHES = BANDS * ROWS
#: Personalisation of the second BLAKE2b call: the 16 more bytes it gives
#: are four more hash functions, independent of the first call's sixteen.
_SECOND = b"bulwark-minhash"
#: array's typecode for 32-bit unsigned integers on this platform.
_U32 = next(code for code in "IL" if array(code).itemsize == 4)


def minhash_signature(shingles: set[str]) -> list[int]:
    """The 20 MinHash values of a set of shingles: for each of 20 hash functions, the smallest hash.

    Each shingle is hashed once into 80 bytes (a 64-byte BLAKE2b digest and a
    16-byte one differently personalised), that is 20 independent 32-bit
    hash functions, and the minima are taken column by column by ``array``
    in C. It used to apply 20 permutations (a*h + b) mod p to a 64-bit hash
    in Python: 20 multiplications per shingle, 9 ms for a 10 KB body of
    everyday words, more than the rest of the content stage costs a message.
    This way is about 3x faster. (Not datasketch: its MinHash brings numpy,
    and its LSH is an in-memory index, while what is needed here is only the
    band keys, to count them on a Kafka topic.)
    """
    blake2b = hashlib.blake2b
    table = array(_U32, b"".join(blake2b(b).digest() + blake2b(b, digest_size=16, person=_SECOND).digest()
                                for b in (s.encode() for s in shingles)))
    return [min(table[i::_HASHES]) for i in range(_HASHES)]


def body_bands(body: str) -> list[str]:
    """The LSH band keys of a normalised body: bodies alike share some."""
    words = body[:MAX_BODY_CHARS].split()
    shingles = {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}
    signature = minhash_signature(shingles)
    return [
        f"{band}:" + hashlib.sha256(",".join(map(str, signature[band * ROWS:(band + 1) * ROWS])).encode()).hexdigest()
        for band in range(BANDS)
    ]


def fingerprints(message: Message) -> dict[str, str]:
    """Fingerprint -> kind ("attachment", "body", "urls")."""
    found: dict[str, str] = {}
    for part in message.attachments():
        if len(part.payload) >= MIN_ATTACHMENT_BYTES:
            found["att:" + hashlib.sha256(part.payload).hexdigest()] = "attachment"
    text, urls = _body_text(message)
    body = normalise(text)
    if len(body) >= MIN_BODY_CHARS:
        for band in body_bands(body):
            found["body:" + band] = "body"
    hosts = sorted(set(urls))
    if hosts:
        found["urls:" + hashlib.sha256("\n".join(hosts).encode()).hexdigest()] = "urls"
    return found


class FingerprintMemo:
    """The fingerprints of the last few message contents, by the blob's SHA-256.

    Two agents of a worker fingerprint each received message: the observer
    (to count) and the outbreak check (to mark). They read the same partition
    of ``mail.received`` in the same process, so whichever comes second takes
    the first's result instead of reading the blob, parsing the MIME and
    MinHashing the body again (together about 3.5 % of the worker's CPU in
    py-spy under bench/e2e_relay.py). A computation in flight is shared too.
    The key is the content's digest, so a hit is always the same bytes.
    """

    def __init__(self, size: int = 512):
        self.size = size
        self._found: OrderedDict[str, asyncio.Future] = OrderedDict()

    def known(self, digest: str) -> bool:
        entry = self._found.get(digest)
        return entry is not None and entry.get_loop() is asyncio.get_running_loop()

    async def of(self, message: Message) -> dict[str, str]:
        digest = message.envelope.sha256
        entry = self._found.get(digest)
        if entry is None or entry.get_loop() is not asyncio.get_running_loop():
            # MinHashing a long body takes milliseconds of CPU: off the event loop.
            entry = asyncio.ensure_future(asyncio.to_thread(fingerprints, message))
            self._found[digest] = entry
            while len(self._found) > self.size:
                self._found.popitem(last=False)
        try:
            # Shielded: one waiter cancelled must not cancel the other's result.
            return dict(await asyncio.shield(entry))
        except Exception:
            if self._found.get(digest) is entry:
                del self._found[digest]  # a failure is not remembered: the next asks again
            raise

    async def of_known(self, digest: str) -> dict[str, str]:
        return dict(await asyncio.shield(self._found[digest]))


#: The worker's memo (one per process; both agents use it).
MEMO = FingerprintMemo()


#: Client addresses remembered per fingerprint and window: a campaign sent
#: by one sender from a botnet must not grow a table value without bound.
MAX_CLIENT_IPS = 1000


def last_seen(window: dict, sender: str, client_ip: str, at: float, refresh_seconds: float) -> dict | None:
    """A window's value after an observation at ``at``, or None when it would not change.

    The value maps ``s:SENDER`` and ``i:ADDRESS`` to when each was last seen.
    A pair seen less than ``refresh_seconds`` ago is not written again: the
    table (and its changelog) is written once per new sender or address and
    refresh period, not once per message. So a sender counts for between
    ``window - refresh`` and ``window`` after its last message, as in the
    oldest of the hopping windows this replaced.
    """
    keys = (f"s:{sender}", f"i:{client_ip}")
    if all(window.get(key, float("-inf")) >= at - refresh_seconds for key in keys):
        return None
    updated = dict(window)
    for key in keys:
        updated[key] = max(at, updated.get(key, at))
    ips = [key for key in updated if key.startswith("i:")]
    if len(ips) > MAX_CLIENT_IPS:
        for key in sorted(ips, key=updated.__getitem__)[: len(ips) - MAX_CLIENT_IPS]:
            del updated[key]
    return updated


def distinct_since(since: float, *windows: dict) -> tuple[int, int]:
    """Distinct senders and client addresses seen at or after ``since`` in these windows."""
    recent = {key for window in windows for key, at in window.items() if at >= since}
    return sum(key.startswith("s:") for key in recent), sum(key.startswith("i:") for key in recent)


class RecentObservations:
    """The observations this worker published lately, so a repeat is not published again.

    The counting agent would not write a sender and address it saw less than
    ``refresh_seconds`` ago (``last_seen``), so publishing that observation
    again changes nothing but costs a record: for a sender mailing one body
    many times, all of them. Kept per worker and bounded; a worker that
    restarts, or a message judged by another worker, only publishes again.
    """

    def __init__(self, refresh_seconds: float, limit: int = 100_000):
        self.refresh_seconds, self.limit = refresh_seconds, limit
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def fresh(self, fingerprint: str, sender: str, client_ip: str, at: float) -> bool:
        """True (and remembered) unless this was published less than the refresh period ago."""
        key = (fingerprint, sender, client_ip)
        if self._seen.get(key, float("-inf")) >= at - self.refresh_seconds:
            return False
        self._seen[key] = at
        self._seen.move_to_end(key)
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True


class _Marked(Mapping):
    """The marked fingerprints, read from the compacted outbreak.alerts topic."""

    def __init__(self, view):
        self.view = view

    def __getitem__(self, fingerprint):
        return self.view.state[fingerprint].model_dump(mode="json")

    def __iter__(self):
        return iter(self.view.state)

    def __len__(self):
        return len(self.view.state)


def register(app, settings_, received_topic, blobs, current_policy) -> dict:
    """Declare the outbreak topics, tables and agents on the Faust app."""
    from bulwark.state import StateView
    from schemas import codec
    from schemas import events as ev
    from schemas.topics import OUTBREAK_ALERTS, OUTBREAK_FINGERPRINTS, record_key
    from streams.checks import CHECKS

    global ACTIVE

    def settings():
        return CHECKS["outbreak"].settings(current_policy())

    fingerprints_topic = app.topic(
        OUTBREAK_FINGERPRINTS.name, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=OUTBREAK_FINGERPRINTS.partitions,
    )
    alerts_topic = app.topic(
        OUTBREAK_ALERTS.name, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=OUTBREAK_ALERTS.partitions,
    )
    # The window is fixed when the worker starts (a Faust table's window is
    # part of its declaration); the threshold follows the live policy.
    window_seconds = settings().window_minutes * 60
    refresh_seconds = max(60, window_seconds // 4)
    # One tumbling window per fingerprint and window width, holding when
    # each sender and client address was last seen (see last_seen below).
    # It was a hopping window of four steps holding sets: every observation
    # wrote four table values, so four changelog records, and about 20 for
    # a message with five body bands, a quarter of all the records a
    # message cost the broker (bench/e2e_relay.py, docs/performance.md).
    seen = app.Table(
        "outbreak-senders", default=dict, key_type=str,
        partitions=OUTBREAK_FINGERPRINTS.partitions,
    ).tumbling(timedelta(seconds=window_seconds), expires=timedelta(seconds=2 * window_seconds))
    # Every worker needs every mark (any worker may judge a message carrying
    # it), so the marks are read from their compacted topic by each worker.
    # (Not a Faust GlobalTable: on a fresh cluster its recovery waits for a
    # changelog topic that Faust's own metadata never sees, and the worker
    # never becomes ready.)
    alerts_view = StateView(settings_, OUTBREAK_ALERTS)
    active = _Marked(alerts_view)
    ACTIVE = active

    recent = RecentObservations(refresh_seconds)

    @app.agent(received_topic)
    async def outbreak_observe(stream):
        await alerts_view.start()
        async for record in stream.events():
            try:
                event = codec.decode(record.value, dict(record.headers or {}).items())
            except (codec.UnknownEvent, ValueError):
                continue
            if not isinstance(event, ev.MessageReceived) or not settings().enabled:
                continue
            if settings().exempts(event.envelope.mail_from):
                continue  # neither counted nor marked (the check lets it pass too)
            try:
                if MEMO.known(event.envelope.sha256):  # the outbreak check did it (or is doing it)
                    found = await MEMO.of_known(event.envelope.sha256)
                else:
                    raw = await blobs.get(event.envelope.sha256)
                    found = await MEMO.of(Message(event.message_id, event.session_id, event.envelope,
                                                  event.direction, raw))
            except OSError as exc:
                log.warning("outbreak: message %s unreadable: %s", event.message_id, exc)
                continue
            except UnreadableMessage as exc:
                # Nothing to count; the content checks fail on it by name
                # (quarantined). Raising here would stop this agent.
                log.info("outbreak: message %s not fingerprinted: %s", event.message_id, exc)
                continue
            sender = event.envelope.mail_from.lower()
            for fingerprint, kind in found.items():
                if not recent.fresh(fingerprint, sender, event.envelope.client_ip, event.occurred_at.timestamp()):
                    continue  # counted lately: publishing it again would change nothing
                observed = ev.OutbreakObserved(
                    message_id=event.message_id, session_id=event.session_id,
                    # Event time of the message, so windows and replays agree.
                    occurred_at=event.occurred_at,
                    fingerprint=fingerprint, kind=kind,
                    sender=sender, client_ip=event.envelope.client_ip,
                )
                value, headers = codec.encode(observed)
                await fingerprints_topic.send(key=record_key(OUTBREAK_FINGERPRINTS, observed), value=value,
                                              headers=headers, timestamp=observed.occurred_at.timestamp())

    @app.agent(fingerprints_topic)
    async def outbreak_count(stream):
        async for record in stream.events():
            try:
                observed = codec.decode(record.value, dict(record.headers or {}).items())
            except (codec.UnknownEvent, ValueError):
                continue
            if not isinstance(observed, ev.OutbreakObserved):
                continue
            fp = observed.fingerprint
            if fp in active:
                continue  # already an outbreak: stop counting, the sets stay bounded
            at = observed.occurred_at.timestamp()
            current_window = seen.table.window.ranges(at)[0]
            previous_window = seen.table.window.ranges(at - window_seconds)[0]
            current = dict(seen[fp][current_window])
            update = last_seen(current, observed.sender, observed.client_ip, at, refresh_seconds)
            if update is not None:
                seen[fp] = current = update  # the window of this record's (event) time
            senders, ips = distinct_since(at - window_seconds, dict(seen[fp][previous_window]), current)
            threshold = settings().threshold_senders
            if senders >= threshold:
                detected = ev.OutbreakDetected(
                    occurred_at=observed.occurred_at, fingerprint=fp, kind=observed.kind,
                    distinct_senders=senders, distinct_client_ips=ips,
                    window_seconds=window_seconds, example_message_id=observed.message_id,
                )
                value, headers = codec.encode(detected)
                await alerts_topic.send(key=record_key(OUTBREAK_ALERTS, detected), value=value,
                                        headers=headers, timestamp=detected.occurred_at.timestamp())
                metrics.OUTBREAKS.labels(kind=observed.kind).inc()
                log.warning("outbreak: %s seen from %d senders", fp, senders)

    return {"outbreak_observe": outbreak_observe, "outbreak_count": outbreak_count}

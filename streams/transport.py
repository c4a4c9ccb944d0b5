"""Faust's Kafka transport, reading only committed records.

Ingest publishes ``mail.received`` in transactions (bulwark/kafka.py): a
message answered 451 may leave an aborted record behind, and the client's
retry is then its only copy. Faust reads ``read_committed`` only under
``processing_guarantee="exactly_once"``, which Bulwark does not use (see
streams/once.py), so this transport sets the isolation level itself. Faust
offers no setting for it; the consumer is built in
``AIOKafkaConsumerThread._create_worker_consumer`` and has not been started
when it returns, so the level is set on it there.

It also decides which offset to commit, which Faust's own bookkeeping got
wrong (found by bench/chaos.py: 13 of 2,558 messages answered 250 were
never judged, their mail.received offsets committed by a worker that had
never processed them). Faust counts as done every offset in a "gap"
between two records it read one after the other, and it takes the later
record's own offset as part of the gap; on a transactional topic (a commit
marker after every record) that is every record, so when a later message
is acknowledged the commit passes messages still being judged (the content
agent runs four at once). With nothing committed yet it skips its check for
a gap at the head altogether. And a message it read while the flow was
being suspended for a rebalance, or one from the generation before, is
dropped without being acknowledged or remembered. A worker that then dies,
or loses the partition, leaves those messages behind the committed offset:
never judged, never delivered. Here an offset is committed only below the
lowest message read and not yet acknowledged (every message read counts,
delivered to the agents or not), so a commit never passes one; a dropped
message holds the partition's commit back until it is read again (Faust
seeks every partition to its committed offset after a rebalance) and judged.
"""

from __future__ import annotations

from collections import defaultdict

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver
from faust.types.tuples import ack_lock

#: Faust asks the broker to hold a fetch up to 1.5 s for data. A read_committed
#: fetch is not answered when a transaction commits (only when records are
#: appended), so a message recorded by ingest's transaction waited up to
#: that long to be judged: under load, every tenth message 1.8 s. Measured
#: with bench/e2e_relay.py (docs/performance.md).
FETCH_MAX_WAIT_MS = 50

#: The broker URL scheme that selects this transport: ``bulwark://host:port``.
SCHEME = "bulwark"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"  # read by AIOKafkaConsumer.start() for its Fetcher
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


def committable(committed: int | None, acked: list[int], unfinished: set[int]) -> int | None:
    """The offset to commit for one partition, or None to commit nothing new.

    ``acked``: offsets whose processing finished; ``unfinished``: offsets read
    and not finished (in an agent's hands, or dropped by Faust before it got
    there). Everything acknowledged below the lowest unfinished offset is done;
    the commit is the next offset after it. Commit markers and other offsets
    no record was read at are neither, and never hold the commit back.
    """
    limit = min((o for o in unfinished if committed is None or o >= committed), default=None)
    done = [o for o in acked if limit is None or o < limit]
    if not done:
        return None
    new = max(done) + 1
    return new if committed is None or new > committed else None


class Consumer(driver.Consumer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: partition -> offsets read and not yet acknowledged
        self._unfinished: dict = defaultdict(set)
        deliver = self.callback

        async def read(message):
            # Every message Faust's fetch loop reads passes here, including those
            # it then drops (suspended flow, old generation) without a trace.
            if self.app.topics.acks_enabled_for(message.topic):
                self._unfinished[message.tp].add(message.offset)
            return await deliver(message)

        self.callback = read

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message) -> bool:
        acked = super().ack(message)
        if message.acked:
            self._unfinished[message.tp].discard(message.offset)
        return acked

    def _new_offset(self, tp):
        with ack_lock:
            committed = self._committed_offset[tp]
            acked = self._acked[tp]
            unfinished = self._unfinished[tp]
            if committed is not None:
                unfinished.difference_update([o for o in unfinished if o < committed])
            new = committable(committed, acked, unfinished)
            if new is not None:
                acked[:] = [o for o in acked if o >= new]
                index = self._acked_index[tp]
                index.difference_update([o for o in index if o < new])
                gaps = self._gap.get(tp)
                if gaps:
                    gaps.chop(0, new)  # Faust's gap bookkeeping is not used here; keep it from growing
            return new

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self._unfinished.pop(tp, None)
        await super().on_partitions_revoked(revoked)


class Transport(driver.Transport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"

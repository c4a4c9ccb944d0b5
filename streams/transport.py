"""Faust's Kafka transport, reading only committed records.

Ingest publishes ``mail.received`` in transactions (bulwark/kafka.py): a
message answered 451 may leave an aborted record behind, and the client's
retry is then its only copy. Faust reads ``read_committed`` only under
``processing_guarantee="exactly_once"``, which Bulwark does not use (see
streams/once.py), so this transport sets the isolation level itself. Faust
offers no setting for it; the consumer is built in
``AIOKafkaConsumerThread._create_worker_consumer`` and has not been started
when it returns, so the level is set on it there.
"""

from __future__ import annotations

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

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


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"

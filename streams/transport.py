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

#: The broker URL scheme that selects this transport: ``bulwark://host:port``.
SCHEME = "bulwark"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"  # read by AIOKafkaConsumer.start() for its Fetcher
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
